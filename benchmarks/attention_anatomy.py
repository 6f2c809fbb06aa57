"""Where the Mosaic GPU attention kernel's time goes at decode and prefill shapes (Llama-3-8B heads, bfloat16,
pages of 16 tokens): GPU time of one layer's attention (the kernel and XLA's glue) as it is, and under two
diagnostic changes that each take one cost away:
- `kv_in_l2`: every sequence's page table points at the same few pages, so the KV reads hit L2, not HBM:
  what is left is the kernel's own chain of work (copies issued, tensor cores, softmax, stores);
- `no_compute`: the KV loop only waits for each block's copies and issues the next ones (no QK, softmax or
  P.V; the output is zeros): the copy pipeline alone.

The KV bytes and TB/s are those of the real case in every row, so each row reads as "as fast as if".

    python benchmarks/attention_anatomy.py [--cases NAME ...] [--variants kernel ...] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from attention import HEAD_DIM, HEADS, KV_HEADS, attend_fn, gpu_time, ragged_batch, save_rows
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gpu

CASES = {  # name: (query tokens of each sequence, context of each sequence, query heads, KV heads)
    "decode 1 x 512": ([1], [512], HEADS, KV_HEADS),
    "decode 256 x 480": ([1] * 256, [480] * 256, HEADS, KV_HEADS),
    # The same KV bytes and blocks with one KV head: a head's K (or V) rows of a page lie 512 B apart in the
    # cache instead of 4 KiB, so this tells whether the cache layout limits the copies.
    "decode 2048 x 480, 1 KV head": ([1] * 2048, [480] * 2048, HEADS // KV_HEADS, 1),
    "decode 64 x 2048": ([1] * 64, [2048] * 64, HEADS, KV_HEADS),
    "decode 256 x 1024": ([1] * 256, [1024] * 256, HEADS, KV_HEADS),
    "prefill 2048": ([2048], [2048], HEADS, KV_HEADS),
}


VARIANTS = ("kernel", "kv_in_l2", "no_compute")


def _copies_only(buf, barriers, fetch, shapes, steps, start, first_pos, **_):
    """The KV loop without its arithmetic: wait for each step's copies, then issue the next ones."""
    def step(j, carry):
        plgpu.barrier_wait(barriers.at[lax.rem(j, shapes.num_stages)])
        pl.when(j + shapes.num_stages < steps)(lambda: fetch(j + shapes.num_stages))
        return carry

    wgmma = plgpu.Layout.WGMMA
    init = (plgpu.layout_cast(jnp.zeros((gpu.ROWS, shapes.head_dim), jnp.float32), wgmma),
            plgpu.layout_cast(jnp.zeros((gpu.ROWS,), jnp.float32), wgmma.reduce(1)),
            plgpu.layout_cast(jnp.ones((gpu.ROWS,), jnp.float32), wgmma.reduce(1)))
    return lax.fori_loop(0, steps, step, init)


@contextlib.contextmanager
def _patched(name: str, value):
    old = getattr(gpu, name)
    setattr(gpu, name, value)
    try:
        yield
    finally:
        setattr(gpu, name, old)


def _measure(variant: str, q, cache, md) -> float:
    if variant == "kv_in_l2":
        md = dataclasses.replace(md, page_indices=md.page_indices % 8)
    if variant == "no_compute":
        with _patched("_attend_steps", _copies_only):
            return gpu_time(attend_fn("pallas_gpu"), q, cache, md)
    return gpu_time(attend_fn("pallas_gpu"), q, cache, md)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output-json")
    args = parser.parse_args()
    rows = []
    print("| case | variant | ms | KV TB/s |")
    print("| --- | --- | --- | --- |")
    for i, case in enumerate(args.cases):
        q_lens, contexts, heads, kv_heads = CASES[case]
        q, cache, md = ragged_batch(q_lens, contexts, 16, jax.random.key(i), heads, kv_heads)
        kv_bytes = sum(contexts) * kv_heads * HEAD_DIM * 2 * 2
        for variant in args.variants:
            seconds = _measure(variant, q, cache, md)
            rows.append({"case": case, "variant": variant, "ms": seconds * 1e3, "tb_per_s": kv_bytes / seconds / 1e12})
            print(f"| {case} | {variant} | {seconds * 1e3:.3f} | {kv_bytes / seconds / 1e12:.2f} |", flush=True)
        del q, cache
    save_rows(args.output_json, rows)


if __name__ == "__main__":
    main()
