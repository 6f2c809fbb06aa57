"""Paged-attention decode on one GPU: jaxllm's backends against JAX's deprecated Triton `paged_attention`,
measured against the device-to-device copy bandwidth.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bfloat16), one layer. For each
batch x context x page size: the median time of a decode step (one query token per sequence), the KV bytes
it must read (batch x context x 8 heads x 128 x 2 (K and V) x 2 bytes) and the bandwidth that implies.
Mixed prefill + decode batches are timed for the jaxllm backends. Writes `attention.json` under $OUT.

    python benchmarks/attention.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import AttentionMetadata, kv_cache_shape

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = jnp.bfloat16


def median_time(fn, *args, repeats: int = 20) -> float:
    """Median seconds of `fn(*args)` after two warm-up calls (each run synchronised)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy (bytes read + bytes written)."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    seconds = median_time(copy, x, repeats=10)
    return 2 * x.nbytes / seconds


def decode_batch(batch: int, context: int, page_size: int, key: jax.Array):
    """Random q, a cache holding `batch` sequences of `context` tokens in shuffled pages, and metadata."""
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq
    k1, k2, k3 = jax.random.split(key, 3)
    cache = jax.random.normal(k1, kv_cache_shape(1, num_pages, page_size, KV_HEADS, HEAD_DIM), DTYPE)
    q = jax.random.normal(k2, (batch, HEADS, HEAD_DIM), DTYPE)
    table = jax.random.permutation(k3, num_pages).reshape(batch, pages_per_seq).astype(jnp.int32)
    md = AttentionMetadata(cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32),
                           kv_lens=jnp.full((batch,), context, jnp.int32), page_indices=table,
                           num_seqs=jnp.asarray([batch], jnp.int32))
    return q, cache, md


def jaxllm_attend(backend: str):
    impl = {"reference": pallas_kernels.reference.attend}[backend]
    return jax.jit(lambda q, cache, md: impl(q, cache, md, 0, sm_scale=HEAD_DIM**-0.5))


def triton_paged(q, cache, md, page_size: int):
    """JAX's deprecated Pallas-Triton kernel, on the same data in its own layout."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    layer = cache[0]  # [pages, page, 2*KVH, D] -> K and V as [KVH, pages, page, D]
    k_pages = jnp.transpose(layer[:, :, 0::2], (2, 0, 1, 3))
    v_pages = jnp.transpose(layer[:, :, 1::2], (2, 0, 1, 3))
    block = max(1, 64 // page_size)
    fn = jax.jit(lambda q, k, v, t, lengths: paged_attention(q, k, v, t, lengths, pages_per_compute_block=block))
    return fn, (q, k_pages, v_pages, md.page_indices, md.kv_lens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    peak = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {peak / 1e12:.2f} TB/s")
    shapes = [(b, c) for b in (1, 8, 64, 256) for c in (512, 4096, 32768) if b * c <= 256 * 8192]
    if args.quick:
        shapes = [(1, 512), (64, 4096)]
    rows = []
    key = jax.random.key(1)
    for page_size in (16, 64):
        for batch, context in shapes:
            q, cache, md = decode_batch(batch, context, page_size, key)
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
            row = {"batch": batch, "context": context, "page_size": page_size, "kv_bytes": kv_bytes}
            row["reference_s"] = median_time(jaxllm_attend("reference"), q, cache, md)
            try:
                fn, triton_args = triton_paged(q, cache, md, page_size)
                row["triton_s"] = median_time(fn, *triton_args)
            except Exception as e:  # the deprecated kernel does not take every shape
                row["triton_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            del q, cache
    print("| batch | context | page | reference ms | ref % copy BW | triton ms | triton % copy BW |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref_bw = r["kv_bytes"] / r["reference_s"] / peak * 100
        tri = (f"{r['triton_s'] * 1e3:.3f} | {r['kv_bytes'] / r['triton_s'] / peak * 100:.0f}%"
               if "triton_s" in r else f"failed | {r['triton_error'][:40]}")
        print(f"| {r['batch']} | {r['context']} | {r['page_size']} | {r['reference_s'] * 1e3:.3f} | "
              f"{ref_bw:.0f}% | {tri} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "attention.json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "copy_bandwidth": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
