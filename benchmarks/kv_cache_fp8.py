"""An 8-bit float KV cache (`--kv-cache-dtype fp8`) on one GPU: the Mosaic GPU kernel's decode time and error
against a bfloat16 cache, and what XLA makes of the K/V write into an 8-bit cache.

Attention: Llama-3-8B heads (32 query, 8 KV, head dim 128), one layer, decode steps (one query token per
sequence) at batch x context shapes; median CUPTI kernel time of `gpu.attend` with a bfloat16 cache and with
float8_e4m3fn / float8_e5m2 caches holding the same values rounded, the KV bytes each reads and the bandwidth
that implies, and each output's worst row error against the float32 reference attention of the cached values.

Write: this step's K/V rows (`--tokens`, 256) scattered into one layer of a 32-layer 8-bit cache, as
`reference.write_kv` does (the cache's bytes) and as a plain scatter of 8-bit floats would; the time and
the operations of the compiled program whose result has the whole cache's shape (the scatter itself, bitcasts,
or converts and copies: the latter would mean the whole cache is rewritten each step). `--write-only` runs
anywhere, a CPU included (there with a smaller cache: `--num-pages 160 --tokens 16`).

    python benchmarks/kv_cache_fp8.py [--block-kv 64] [--num-stages 2] [--attention-only | --write-only]
        [--num-pages 8192] [--tokens 256] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from attention import HEAD_DIM, KV_HEADS, gpu_time, ragged_batch, save_rows

from pallas_kernels import gpu, reference
from pallas_kernels.metadata import plan_rows
from pallas_kernels.reference import to_cache_dtype

SHAPES = [(1, 512), (64, 2048), (256, 480), (256, 1024)]
CACHES = {"bfloat16": jnp.bfloat16, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
PAGE = 16


def attention_rows(key: jax.Array, sizes: gpu.BlockSizes) -> list[dict]:
    """One row per shape and cache dtype: time, KV bytes, bandwidth, worst row error."""
    rows = []
    for batch, context in SHAPES:
        q, cache, md = ragged_batch([1] * batch, [context] * batch, PAGE, key)
        for name, dtype in CACHES.items():
            stored, fmt = to_cache_dtype(cache, dtype), None
            if jnp.dtype(dtype).itemsize == 1:  # stored as bytes, as the engine stores it
                stored, fmt = jax.lax.bitcast_convert_type(stored, jnp.uint8), jnp.dtype(dtype).name
            fn = jax.jit(lambda q, c, md, fmt=fmt: gpu.attend(q, c, md, 0, sm_scale=HEAD_DIM**-0.5, sizes=sizes,
                                                              sliding_window=None, soft_cap=None, cache_format=fmt))
            out = fn(q, stored, md)
            expected = reference.attend(q.astype(jnp.float32), stored, md, 0, sm_scale=HEAD_DIM**-0.5,
                                        cache_format=fmt)
            err = jnp.linalg.norm(out.astype(jnp.float32) - expected, axis=(1, 2)) / jnp.linalg.norm(
                expected, axis=(1, 2))
            seconds = gpu_time(fn, q, stored, md)
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * jnp.dtype(dtype).itemsize
            rows.append({"batch": batch, "context": context, "cache": name, "us": seconds * 1e6,
                         "tbs": kv_bytes / seconds / 1e12, "max_row_error": float(err.max())})
            print(rows[-1], flush=True)
    return rows


def write_rows(key: jax.Array, num_pages: int = 8192, tokens: int = 256) -> list[dict]:
    """`reference.write_kv` into a [32, num_pages, 16, 16, 128] cache of float8_e4m3fn bytes, against a plain
    scatter into a cache of float8_e4m3fn values."""
    shape = (32, num_pages, PAGE, 2 * KV_HEADS, HEAD_DIM)
    k, v = (jax.random.normal(s, (tokens, KV_HEADS, HEAD_DIM), jnp.bfloat16) for s in jax.random.split(key))
    _, _, md = ragged_batch([1] * tokens, [PAGE * (num_pages // tokens)] * tokens, PAGE, key)  # every page once
    plan = plan_rows(md, tokens, PAGE)

    def plain(k, v, cache, md):
        kv = jnp.stack([k, v], axis=2).reshape(tokens, 2 * KV_HEADS, HEAD_DIM)
        return cache.at[5, plan.page, plan.pos % PAGE].set(to_cache_dtype(kv, cache.dtype), mode="drop")

    variants = {"bytes (write_kv)": (jnp.uint8, lambda k, v, c, md: reference.write_kv(
        k, v, c, md, 5, plan, "float8_e4m3fn")), "plain": (jnp.float8_e4m3fn, plain)}
    rows = []
    for name, (dtype, fn) in variants.items():
        step = jax.jit(fn, donate_argnums=(2,))
        cache = jnp.zeros(shape, dtype)
        hlo = step.lower(k, v, cache, md).compile().as_text()
        shaped = re.compile(rf"= (\w+)\[{','.join(map(str, shape))}\]\S* ([\w-]+)\(")
        whole = [" ".join(m.groups()) for m in map(shaped.search, hlo.splitlines()) if m]
        cache = step(k, v, cache, md)
        seconds = _time_donated(step, k, v, cache, md)
        rows.append({"write": name, "us": seconds * 1e6, "cache_gb": np.prod(shape) / 1e9,
                     "ops_on_whole_cache": sorted(set(whole))})
        print(rows[-1], flush=True)
    return rows


def _time_donated(step, k, v, cache, md, iterations: int = 10) -> float:
    """Median wall seconds of a step that donates its cache (CUPTI's helper would reuse a donated buffer)."""
    times = []
    for _ in range(iterations):
        jax.block_until_ready(cache)
        start = time.perf_counter()
        cache = step(k, v, cache, md)
        jax.block_until_ready(cache)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-kv", type=int, default=gpu.BlockSizes.block_kv)
    parser.add_argument("--num-stages", type=int, default=gpu.BlockSizes.num_stages)
    parser.add_argument("--attention-only", action="store_true", help="leave out the write rows")
    parser.add_argument("--write-only", action="store_true", help="leave out the attention rows")
    parser.add_argument("--num-pages", type=int, default=8192, help="pages of the written cache")
    parser.add_argument("--tokens", type=int, default=256, help="K/V rows written")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    key = jax.random.key(0)
    writes = [] if args.attention_only else write_rows(key, args.num_pages, args.tokens)
    if args.write_only:
        save_rows(args.output_json, writes)
        return
    attention = attention_rows(key, gpu.BlockSizes(block_kv=args.block_kv, num_stages=args.num_stages))
    print("\n| batch x context | " + " | ".join(CACHES) + " |\n|" + " --- |" * (len(CACHES) + 1))
    for batch, context in SHAPES:
        cells = [f"{r['us']:.1f} us ({r['tbs']:.2f} TB/s, err {r['max_row_error']:.1e})" for r in attention
                 if (r["batch"], r["context"]) == (batch, context)]
        print(f"| {batch} x {context} | " + " | ".join(cells) + " |")
    save_rows(args.output_json, attention + writes)


if __name__ == "__main__":
    main()
