"""The Mosaic GPU attention kernel's KV splits at small decode batches: GPU time of one layer's attention (Llama-3-8B
heads, bfloat16, pages of 16 tokens; the kernel and the split merge) in the engine's smallest decode bucket (16
token and sequence slots, the rest padding), for each number of splits, against the KV bytes it reads. The
heuristic sizes a tile's splits by the bucket's sequence slots (3 in this bucket; `--splits 0`), whatever the
batch's own sequences and context: this measures what that leaves at one sequence and at long contexts. The times
include the kernel's per-call planning (tens of microseconds), the same for every variant: compare the variants
of a case, not the cases.

    python benchmarks/attention_splits.py [--splits 0 1 2 3 4 8 16] [--output-json PATH]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from attention import HEAD_DIM, KV_HEADS, attend_fn, gpu_time, ragged_batch, save_rows

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
    print("| sequences x context | splits | us | KV TB/s |\n| --- | --- | --- | --- |")
    for i, (seqs, context) in enumerate(CASES):
        q, cache, md = ragged_batch([1] * seqs, [context] * seqs, 16, jax.random.key(i), max_seqs=BUCKET)
        q = jnp.pad(q, ((0, BUCKET - seqs), (0, 0), (0, 0)))  # the bucket's padding tokens
        kv_bytes = seqs * context * KV_HEADS * HEAD_DIM * 2 * 2
        for splits in args.splits:
            fn = attend_fn("pallas_gpu", sizes=gpu.BlockSizes(num_splits=splits or None))
            seconds = gpu_time(fn, q, cache, md)
            rows.append({"sequences": seqs, "context": context, "splits": splits, "us": seconds * 1e6,
                         "tb_per_s": kv_bytes / seconds / 1e12})
            tb_per_s = kv_bytes / seconds / 1e12
            print(f"| {seqs} x {context} | {splits or 'heuristic'} | {seconds * 1e6:.1f} | {tb_per_s:.2f} |")
        del q, cache
    save_rows(args.output_json, rows)


if __name__ == "__main__":
    main()
