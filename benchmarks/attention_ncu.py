"""Runs one `attention_anatomy.py` case's attention a few times with no profiler of our own, for Nsight
Compute to profile the kernel (CUPTI takes one subscriber, so the anatomy's timing cannot run under it):

    ncu --kernel-name regex:mosaic --launch-skip 2 --launch-count 1 --set full -o attn \
        python benchmarks/attention_ncu.py --case "decode 256 x 480"
    ncu -i attn.ncu-rep --page details
"""

from __future__ import annotations

import argparse

import jax
from attention import attend_fn, ragged_batch
from attention_anatomy import CASES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=list(CASES), default="decode 256 x 480")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    q_lens, contexts, heads, kv_heads = CASES[args.case]
    q, cache, md = ragged_batch(q_lens, contexts, 16, jax.random.key(0), heads, kv_heads)
    fn = attend_fn("pallas_gpu")
    for _ in range(args.calls):
        jax.block_until_ready(fn(q, cache, md))


if __name__ == "__main__":
    main()
