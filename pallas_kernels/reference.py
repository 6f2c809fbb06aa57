"""Ragged paged attention in plain jnp: the semantics every kernel must reproduce, and the CPU backend.

Each call first writes this step's K/V into their pages, then attends every query row over its own
sequence's pages, a few page-columns at a time with an online softmax (flash-attention style), so memory
stays bounded whatever the context length and the work is proportional to tokens x pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.metadata import AttentionMetadata, AttentionPlan, plan_rows

_MASKED = -1e30


def write_kv(
    k: jax.Array, v: jax.Array, kv_cache: jax.Array, md: AttentionMetadata, layer: jax.Array | int,
    plan: AttentionPlan | None = None, cache_format: str | None = None,
) -> jax.Array:
    """Scatter this step's K/V rows `[T, KVH, D]` into their pages of `kv_cache[layer]`; padding rows are dropped.
    `cache_format`: the 8-bit float type a byte (uint8) cache holds (`cache_values`)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    page_size = kv_cache.shape[2]
    plan = plan or plan_rows(md, num_tokens, page_size)
    page = jnp.where(plan.valid, plan.page, kv_cache.shape[1])  # out of range: dropped
    kv = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)
    kv = to_cache_dtype(kv, cache_format or kv_cache.dtype)
    if cache_format is not None:
        kv = jax.lax.bitcast_convert_type(kv, kv_cache.dtype)
    return kv_cache.at[layer, page, plan.pos % page_size].set(kv, mode="drop")


def cache_values(stored: jax.Array, cache_format: str | None) -> jax.Array:
    """Cache entries as values: a byte cache's as its 8-bit float `cache_format`, others as they are. 8-bit caches
    are stored as bytes because XLA has no in-place update of 8-bit floats on a CPU: a scatter into one ran in
    float16 over the whole cache there (221 ms against 0.26 for bytes, 168 MB), and a bitcast of the whole cache
    is a copy. On an H100 either form was in place (`benchmarks/kv_cache_fp8.py`)."""
    return stored if cache_format is None else jax.lax.bitcast_convert_type(stored, jnp.dtype(cache_format))


def to_cache_dtype(x: jax.Array, dtype) -> jax.Array:
    """`x` as the cache stores it. 8-bit floats saturate at their largest finite value, as vLLM's FP8 cache
    writes do (a plain cast would turn e4m3's overflow into NaN and e5m2's into infinity)."""
    if jnp.dtype(dtype).itemsize == 1:
        largest = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -largest, largest)
    return x.astype(dtype)


def attend(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    layer: jax.Array | int,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    plan: AttentionPlan | None = None,
    cache_format: str | None = None,
) -> jax.Array:
    """Attention of query rows `q [T, H, D]` over the pages already holding their sequences' K/V."""
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3] // 2
    group = num_heads // num_kv_heads
    plan = plan or plan_rows(md, num_tokens, page_size)
    seq, pos, valid = plan.seq, plan.pos, plan.valid
    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    span = _pages_per_step(num_tokens, kv_cache.shape[2:], md.pages_per_seq)
    block = span * page_size

    def page_column(j, carry):
        m, denom, acc = carry
        columns = jnp.minimum(j * span + jnp.arange(span), md.pages_per_seq - 1)
        pages = kv_cache[layer, md.page_indices[seq[:, None], columns[None, :]]]  # [T, span, P, 2*KVH, D]
        pages = cache_values(pages, cache_format).reshape(num_tokens, block, 2 * num_kv_heads, head_dim)
        pages = pages.astype(jnp.float32)
        k, v = pages[:, :, 0::2], pages[:, :, 1::2]
        s = jnp.einsum("tkgd,tpkd->tkgp", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = j * block + jnp.arange(block)
        allowed = (kv_pos[None, :] <= pos[:, None]) & valid[:, None]
        if sliding_window is not None:
            allowed &= kv_pos[None, :] > pos[:, None] - sliding_window
        s = jnp.where(allowed[:, None, None, :], s, _MASKED)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(allowed[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        denom = denom * scale + p.sum(axis=-1)
        acc = acc * scale[..., None] + jnp.einsum("tkgp,tpkd->tkgd", p, v)
        return m_new, denom, acc

    init = (
        jnp.full((num_tokens, num_kv_heads, group), _MASKED, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    # Only as many page columns as the longest sequence of this batch fills (a dynamic trip count).
    num_steps = (jnp.minimum(jnp.max(md.kv_lens), md.pages_per_seq * page_size) + block - 1) // block
    _, denom, acc = jax.lax.fori_loop(0, num_steps, page_column, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def _pages_per_step(num_tokens: int, page_shape: tuple[int, ...], pages_per_seq: int,
                    budget_bytes: int = 256 << 20) -> int:
    """Pages gathered per loop step: as many as keep the float32 gather of all rows under `budget_bytes`
    (a power of two up to 16). Fewer, larger steps matter on GPUs, where each step costs kernel launches."""
    page_bytes = num_tokens * int(np.prod(page_shape)) * 4
    span = 1
    while span < 16 and span * 2 <= pages_per_seq and page_bytes * span * 2 <= budget_bytes:
        span *= 2
    return span


def ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    layer: jax.Array | int = 0,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    plan: AttentionPlan | None = None,
    cache_format: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write this step's K/V into the cache, then attend; returns `(out [T, H, D], kv_cache')`. `plan`: the
    step's `AttentionPlan` (derived from `md` when not given). `cache_format`: see `cache_values`."""
    plan = plan or plan_rows(md, q.shape[0], kv_cache.shape[2])
    kv_cache = write_kv(k, v, kv_cache, md, layer, plan, cache_format)
    out = attend(q, kv_cache, md, layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                 plan=plan, cache_format=cache_format)
    return out, kv_cache
