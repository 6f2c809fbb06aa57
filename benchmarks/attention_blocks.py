"""The Mosaic GPU attention kernel's block sizes at decode and prefill shapes: GPU time of one layer's
attention (Llama-3-8B heads, bfloat16, pages of 16 tokens; the kernel and XLA's split merge) for each
(block_kv, num_stages) against the KV bytes it reads, and each variant's worst error against the default's
output. Fewer stages take less shared memory, so that two blocks may share an SM and one block's pipeline
fill overlaps another's work.

    python benchmarks/attention_blocks.py [--output-json PATH]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from attention import HEAD_DIM, KV_HEADS, attend_fn, gpu_time, ragged_batch, save_rows

from pallas_kernels import gpu

CASES = {  # name: (query tokens of each sequence, context of each sequence)
    "decode 1 x 512": ([1], [512]),
    "decode 64 x 2048": ([1] * 64, [2048] * 64),
    "decode 256 x 480": ([1] * 256, [480] * 256),
    "decode 256 x 1024": ([1] * 256, [1024] * 256),
    "prefill 512 (context 1024) + 63 decodes x 2048": ([512] + [1] * 63, [1024] + [2048] * 63),
    "prefill 2048": ([2048], [2048]),
}
VARIANTS = ((64, 2), (64, 3), (64, 4), (128, 2))  # (block_kv, num_stages); the first is the default


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-json")
    args = parser.parse_args()
    rows = []
    print("| case | block_kv | stages | ms | KV TB/s | max abs diff vs default |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, (case, (q_lens, contexts)) in enumerate(CASES.items()):
        q, cache, md = ragged_batch(q_lens, contexts, 16, jax.random.key(i))
        kv_bytes = sum(contexts) * KV_HEADS * HEAD_DIM * 2 * 2
        base = None
        for block_kv, stages in VARIANTS:
            fn = attend_fn("pallas_gpu", sizes=gpu.BlockSizes(block_kv=block_kv, num_stages=stages))
            out = np.asarray(fn(q, cache, md), np.float32)
            base = out if base is None else base
            seconds = gpu_time(fn, q, cache, md)
            row = {"case": case, "block_kv": block_kv, "num_stages": stages,
                   "ms": seconds * 1e3, "tb_per_s": kv_bytes / seconds / 1e12,
                   "max_abs_diff": float(np.abs(out - base).max())}
            rows.append(row)
            print(f"| {case} | {block_kv} | {stages} | {row['ms']:.3f} | {row['tb_per_s']:.2f} | "
                  f"{row['max_abs_diff']:.2e} |")
        del q, cache
    save_rows(args.output_json, rows)


if __name__ == "__main__":
    main()
