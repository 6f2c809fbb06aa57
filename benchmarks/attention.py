"""Ragged paged attention on one GPU: jaxllm's backends against JAX's deprecated Triton `paged_attention`,
measured against the device-to-device copy bandwidth; and a correctness sweep of the Mosaic GPU kernel.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bfloat16), one layer. For each
batch x context x page size: the median GPU time of a decode step (one query token per sequence; CUPTI
kernel time, so launch gaps are left out), the KV bytes it must read (batch x context x 8 heads x 128 x 2
(K and V) x 2 bytes) and the bandwidth that implies. Mixed prefill + decode batches too. The check sweep
runs random ragged batches (head dims 64/128/256, page sizes 16-256, GQA, windows, soft-caps, splits)
against the float32 reference and reports the worst relative error of any query row.

    python benchmarks/attention.py [--quick] [--check-only]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels import AttentionMetadata, gpu, kv_cache_shape, reference

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = jnp.bfloat16


def gpu_time(fn, *args, iterations: int = 20) -> float:
    """Median seconds of GPU time of `fn(*args)` (all its kernels), after a warm-up call."""
    jax.block_until_ready(fn(*args))
    _, times = profiler.measure(fn, iterations=iterations)(*args)
    return float(np.median(times)) / 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy (bytes read + bytes written)."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)
    seconds = gpu_time(jax.jit(lambda a: a * 1.0001), x, iterations=10)
    return 2 * x.nbytes / seconds


def ragged_batch(q_lens, contexts, page_size: int, key: jax.Array, heads=HEADS, kv_heads=KV_HEADS,
                 head_dim=HEAD_DIM, dtype=DTYPE, max_seqs: int | None = None):
    """Random q, a cache holding each sequence's context in shuffled pages, and the metadata."""
    batch = len(q_lens)
    max_seqs = max_seqs or batch
    pages_per_seq = -(-max(contexts) // page_size)
    num_pages = batch * pages_per_seq
    k1, k2, k3 = jax.random.split(key, 3)
    cache = jax.random.normal(k1, kv_cache_shape(1, num_pages, page_size, kv_heads, head_dim), dtype)
    q = jax.random.normal(k2, (sum(q_lens), heads, head_dim), dtype)
    table = jax.random.permutation(k3, num_pages).reshape(batch, pages_per_seq).astype(jnp.int32)
    table = jnp.pad(table, ((0, max_seqs - batch), (0, 0)))
    cu = np.concatenate([[0], np.cumsum(q_lens), np.full(max_seqs - batch, sum(q_lens))])
    md = AttentionMetadata(cu_q_lens=jnp.asarray(cu, jnp.int32),
                           kv_lens=jnp.asarray(list(contexts) + [0] * (max_seqs - batch), jnp.int32),
                           page_indices=table, num_seqs=jnp.asarray([batch], jnp.int32))
    return q, cache, md


def print_grid(results: list[dict], keys: tuple[str, str], firsts, seconds, columns: list[str],
               cell=lambda r: f"{r['us']:.1f} ({r['tbs']:.2f})") -> None:
    """A markdown table of benchmark rows: one line per (`keys[0]`, `keys[1]`) pair of values, one `cell` per
    matching row, in `results`' order, under the headers `columns`."""
    print("\n| " + " | ".join([*keys, *columns]) + " |\n|" + " --- |" * (len(keys) + len(columns)))
    for first in firsts:
        for second in seconds:
            cells = [cell(r) for r in results if r[keys[0]] == first and r[keys[1]] == second]
            print(f"| {first} | {second} | " + " | ".join(cells) + " |")


def save_rows(path: str | None, rows: list[dict]) -> None:
    """Write a benchmark's table rows with the device's name as JSON, where a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


def attend_fn(backend: str, sm_scale: float = HEAD_DIM**-0.5, **kw):
    impl = {"reference": reference.attend, "pallas_gpu": gpu.attend}[backend]
    if backend == "pallas_gpu":
        kw.setdefault("sizes", gpu.BlockSizes())
    kw.setdefault("sliding_window", None)
    kw.setdefault("soft_cap", None)
    return jax.jit(lambda q, cache, md: impl(q, cache, md, 0, sm_scale=sm_scale, **kw))


def triton_paged(q, cache, md, page_size: int):
    """JAX's deprecated Pallas-Triton kernel, on the same data in its own layout."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    layer = cache[0]  # [pages, page, 2*KVH, D] -> K and V as [KVH, pages, page, D]
    k_pages = jnp.transpose(layer[:, :, 0::2], (2, 0, 1, 3))
    v_pages = jnp.transpose(layer[:, :, 1::2], (2, 0, 1, 3))
    block = max(1, 64 // page_size)
    fn = jax.jit(lambda q, k, v, t, lengths: paged_attention(q, k, v, t, lengths, pages_per_compute_block=block))
    return fn, (q, k_pages, v_pages, md.page_indices, md.kv_lens)


CHECKS = [
    # q_lens, contexts, heads, kv_heads, head_dim, page, window, soft_cap, splits
    ([1] * 8, [1, 17, 40, 64, 65, 300, 1000, 4096], 32, 8, 128, 16, None, None, None),
    ([1] * 8, [1, 17, 40, 64, 65, 300, 1000, 4096], 32, 8, 128, 16, None, None, 1),
    ([7, 1, 130, 3, 64], [7, 300, 200, 19, 64], 32, 8, 128, 64, None, None, None),
    ([5, 9, 1], [21, 90, 500], 8, 8, 64, 32, None, None, 3),
    ([9, 1, 40], [9, 250, 300], 28, 4, 128, 16, 64, None, None),  # Qwen2.5-style G=7, sliding window
    ([3, 6, 1], [110, 6, 900], 16, 2, 256, 128, None, 30.0, None),  # soft-cap, head dim 256
    ([2, 1, 17], [600, 1025, 17], 8, 1, 128, 256, None, None, 2),  # MQA, page 256
    ([200, 1, 1], [1200, 2000, 33], 32, 8, 128, 16, 512, None, None),
]


def check(key: jax.Array) -> list[dict]:
    """The kernel against the float32 reference on random ragged batches, bfloat16 and float32 (computed as
    bfloat16 halves); every query row must match (2e-2 relative for bfloat16, 1e-4 for float32)."""
    rows = []
    for dtype, tolerance in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-4)):
        for i, (q_lens, ctx, h, kvh, d, page, window, cap, splits) in enumerate(CHECKS):
            if dtype == jnp.float32 and d > 128:
                continue  # float32 tiles of head dim 256 do not fit in shared memory (the kernel says so)
            q, cache, md = ragged_batch(q_lens, ctx, page, jax.random.fold_in(key, i), h, kvh, d, dtype=dtype,
                                        max_seqs=len(q_lens) + 2)
            kw = dict(sm_scale=d**-0.5, sliding_window=window, soft_cap=cap)
            out = attend_fn("pallas_gpu", sizes=gpu.BlockSizes(num_splits=splits), **kw)(q, cache, md)
            cpu = jax.devices("cpu")[0]  # float32 on the CPU: no TF32 anywhere in the reference
            ref = attend_fn("reference", **kw)(*jax.device_put((q.astype(jnp.float32),
                                                                cache.astype(jnp.float32), md), cpu))
            out, ref = np.asarray(out, np.float32), np.asarray(ref)
            row_err = np.linalg.norm(out - ref, axis=(1, 2)) / np.maximum(np.linalg.norm(ref, axis=(1, 2)), 1e-6)
            finite = bool(np.isfinite(out).all())
            rows.append({"case": i, "dtype": jnp.dtype(dtype).name, "rel_err": float(np.linalg.norm(out - ref)
                                                                                       / np.linalg.norm(ref)),
                         "worst_row_rel_err": float(row_err.max()), "finite": finite,
                         "ok": bool(finite and row_err.max() < tolerance)})
    return rows


def time_decode(shapes, page_sizes, peak: float, key: jax.Array) -> list[dict]:
    rows = []
    for page_size in page_sizes:
        for batch, context in shapes:
            q, cache, md = ragged_batch([1] * batch, [context] * batch, page_size, key)
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
            row = {"kind": "decode", "batch": batch, "context": context, "page_size": page_size,
                   "kv_bytes": kv_bytes}
            for backend in ("pallas_gpu", "reference"):
                row[f"{backend}_s"] = gpu_time(attend_fn(backend), q, cache, md)
            try:
                fn, triton_args = triton_paged(q, cache, md, page_size)
                row["triton_s"] = gpu_time(fn, *triton_args)
            except Exception as e:  # the deprecated kernel does not take every shape
                row["triton_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            del q, cache
    return rows


def time_mixed(peak: float, key: jax.Array) -> list[dict]:
    """A prefill chunk of 512 tokens riding with 63 decodes at context 2048 (what a busy engine step is)."""
    rows = []
    for page_size in (16, 64):
        q_lens, ctx = [512] + [1] * 63, [1024] + [2048] * 63
        q, cache, md = ragged_batch(q_lens, ctx, page_size, key)
        kv_bytes = sum(ctx) * KV_HEADS * HEAD_DIM * 2 * 2
        row = {"kind": "mixed 512 prefill + 63 decode", "batch": 64, "context": 2048, "page_size": page_size,
               "kv_bytes": kv_bytes}
        for backend in ("pallas_gpu", "reference"):
            row[f"{backend}_s"] = gpu_time(attend_fn(backend), q, cache, md)
        rows.append(row)
    return rows


def print_table(rows: list[dict], peak: float) -> None:
    def cell(r, name):
        if f"{name}_s" not in r:
            return "failed | -"
        return f"{r[f'{name}_s'] * 1e3:.3f} | {r['kv_bytes'] / r[f'{name}_s'] / peak * 100:.0f}%"

    print("| kind | batch | context | page | pallas_gpu ms | % copy BW | reference ms | % | triton ms | % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kind']} | {r['batch']} | {r['context']} | {r['page_size']} | {cell(r, 'pallas_gpu')} | "
              f"{cell(r, 'reference')} | {cell(r, 'triton')} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    key = jax.random.key(1)
    checks = check(key)
    for c in checks:
        print(c)
    result = {"device": jax.devices()[0].device_kind, "checks": checks}
    if not args.check_only:
        peak = copy_bandwidth()
        print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {peak / 1e12:.2f} TB/s")
        shapes = [(b, c) for b in (1, 16, 64, 256) for c in (512, 4096, 32768) if b * c <= 256 * 8192]
        if args.quick:
            shapes = [(1, 512), (64, 4096), (256, 512)]
        rows = time_decode(shapes, (16, 64), peak, key) + time_mixed(peak, key)
        print_table(rows, peak)
        result.update(copy_bandwidth=peak, rows=rows)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "attention.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
