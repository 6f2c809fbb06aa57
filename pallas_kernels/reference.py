"""Ragged paged attention in plain jnp: the semantics every kernel must reproduce, and the CPU backend.

Each call first writes this step's K/V into their pages, then attends every query row over its own
sequence's pages, one page-column at a time with an online softmax (flash-attention style), so memory
stays `O(tokens x page_size)` whatever the context length and the work is proportional to tokens x pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.metadata import AttentionMetadata, token_layout

_MASKED = -1e30


def write_kv(
    k: jax.Array, v: jax.Array, kv_cache: jax.Array, md: AttentionMetadata, layer: jax.Array | int
) -> jax.Array:
    """Scatter this step's K/V rows `[T, KVH, D]` into their pages of `kv_cache[layer]`; padding rows are dropped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    page_size = kv_cache.shape[2]
    seq, pos, valid = token_layout(md, num_tokens)
    page = md.page_indices[seq, pos // page_size]
    page = jnp.where(valid, page, kv_cache.shape[1])  # out of range: dropped
    kv = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)
    return kv_cache.at[layer, page, pos % page_size].set(kv.astype(kv_cache.dtype), mode="drop")


def attend(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    layer: jax.Array | int,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention of query rows `q [T, H, D]` over the pages already holding their sequences' K/V."""
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3] // 2
    group = num_heads // num_kv_heads
    seq, pos, valid = token_layout(md, num_tokens)
    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)

    def page_column(j, carry):
        m, denom, acc = carry
        pages = kv_cache[layer, md.page_indices[seq, j]].astype(jnp.float32)  # [T, P, 2*KVH, D]
        k, v = pages[:, :, 0::2], pages[:, :, 1::2]
        s = jnp.einsum("tkgd,tpkd->tkgp", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = j * page_size + jnp.arange(page_size)
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
    num_columns = (jnp.max(md.kv_lens) + page_size - 1) // page_size
    _, denom, acc = jax.lax.fori_loop(0, jnp.minimum(num_columns, md.pages_per_seq), page_column, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


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
) -> tuple[jax.Array, jax.Array]:
    """Write this step's K/V into the cache, then attend; returns `(out [T, H, D], kv_cache')`."""
    kv_cache = write_kv(k, v, kv_cache, md, layer)
    out = attend(q, kv_cache, md, layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    return out, kv_cache
