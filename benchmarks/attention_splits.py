"""The Mosaic GPU attention kernel's KV splits at small decode batches: GPU time of one layer's attention (Llama-3-8B
heads, bfloat16, pages of 16 tokens; the kernel and the split merge) in the engine's smallest decode bucket (16
token and sequence slots, the rest padding), for each number of splits, against the KV bytes it reads. The
heuristic sizes a tile's splits by the bucket's sequence slots (3 in this bucket; `--splits 0`), whatever the
batch's own sequences and context: this measures what that leaves at one sequence and at long contexts. Each
variant's GPU time is split into the attention kernel, the split merge, and the rest: the call's planning, which
the engine pays once a step, not once a layer (tens of microseconds here).

    python benchmarks/attention_splits.py [--splits 0 1 2 3 4 8 16] [--output-json PATH]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from attention import HEAD_DIM, KV_HEADS, attend_fn, ragged_batch, save_rows
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels import gpu

BUCKET = 16  # token and sequence slots of the engine's smallest decode bucket
CASES = ((1, 512), (1, 2048), (1, 8192), (4, 1536), (4, 8192), (16, 512), (16, 2048))  # (sequences, context)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4, 8, 16],
                        help="KV splits a tile; 0: the kernel's heuristic")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    rows = []
    print("| sequences x context | splits | kernel + merge us | kernel us | merge us | planning us | KV TB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (seqs, context) in enumerate(CASES):
        q, cache, md = ragged_batch([1] * seqs, [context] * seqs, 16, jax.random.key(i), max_seqs=BUCKET)
        q = jnp.pad(q, ((0, BUCKET - seqs), (0, 0), (0, 0)))  # the bucket's padding tokens
        kv_bytes = seqs * context * KV_HEADS * HEAD_DIM * 2 * 2
        for splits in args.splits:
            fn = attend_fn("pallas_gpu", sizes=gpu.BlockSizes(num_splits=splits or None))
            us = kernel_times(fn, q, cache, md)
            work = us["kernel"] + us["merge"]
            rows.append({"sequences": seqs, "context": context, "splits": splits, **us,
                         "tb_per_s": kv_bytes / work / 1e6})
            print(f"| {seqs} x {context} | {splits or 'heuristic'} | {work:.1f} | {us['kernel']:.1f} | "
                  f"{us['merge']:.1f} | {us['planning']:.1f} | {kv_bytes / work / 1e6:.2f} |")
        del q, cache
    save_rows(args.output_json, rows)


def kernel_times(fn, *args, iterations: int = 20) -> dict[str, float]:
    """Median microseconds a call of `fn` spends in the attention kernel (Mosaic GPU), the split merge
    (`merge_splits`) and the rest (planning; XLA's gather where one split needs no merge), by CUPTI."""
    jax.block_until_ready(fn(*args))
    _, calls = profiler.measure(fn, aggregate=False, iterations=iterations)(*args)
    by_kind = {"kernel": [], "merge": [], "planning": []}
    for kernels in calls:
        totals = dict.fromkeys(by_kind, 0.0)
        for name, ms in kernels:
            kind = "kernel" if "mosaic" in name else "merge" if "merge" in name else "planning"
            totals[kind] += ms * 1e3
        for kind, us in totals.items():
            by_kind[kind].append(us)
    return {kind: float(np.median(us)) for kind, us in by_kind.items()}


if __name__ == "__main__":
    main()
