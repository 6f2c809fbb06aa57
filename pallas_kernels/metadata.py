"""The ragged batch description shared by every ragged paged attention implementation.

A batch is one flat array of `T` query tokens belonging to up to `S` sequences. Sequence `s` owns query
rows `cu_q_lens[s]:cu_q_lens[s+1]` and, after this step, `kv_lens[s]` tokens of KV cache, stored in the
pages `page_indices[s, :cdiv(kv_lens[s], page_size)]`. Its queries are the *last* `q_len` of those tokens,
so query row `i` of `s` sits at position `kv_lens[s] - q_len + i` (the causal offset). Rows past
`cu_q_lens[num_seqs]` and sequences past `num_seqs` are padding: they read and write nothing.

The KV cache of all layers is one array `[num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim]`
with K and V interleaved on the heads axis (K of head h at 2h, V at 2h+1), so that sharding the heads axis
keeps each head's K and V on the same device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Device arrays describing a ragged batch (all int32)."""

    cu_q_lens: jax.Array  # [S + 1] cumulative query lengths
    kv_lens: jax.Array  # [S] KV length of each sequence including this step's tokens
    page_indices: jax.Array  # [S, pages_per_seq] page table
    num_seqs: jax.Array  # [1] number of real sequences

    @property
    def max_num_seqs(self) -> int:
        return self.kv_lens.shape[0]

    @property
    def pages_per_seq(self) -> int:
        return self.page_indices.shape[1]


def token_layout(md: AttentionMetadata, num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per query row: its sequence id, its position in that sequence, and whether it is a real token."""
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(md.cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, md.max_num_seqs - 1)
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
    pos = md.kv_lens[seq] - q_lens[seq] + (rows - md.cu_q_lens[seq])
    valid = rows < md.cu_q_lens[md.num_seqs[0]]
    return seq, pos, valid


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What every layer's attention derives from the batch layout, computed once per step rather than once
    per layer (on GPUs each derivation is a few kernel launches, and a step has dozens of layers)."""

    seq: jax.Array  # [T] sequence of each query row
    pos: jax.Array  # [T] its position in that sequence
    valid: jax.Array  # [T] bool, a real token (not padding)
    page: jax.Array  # [T] the cache page its K/V go to
    kernel: Any = None  # the kernel's own tables (the GPU kernel's tiles), None for the others


def plan_rows(md: AttentionMetadata, num_tokens: int, page_size: int, kernel: Any = None) -> AttentionPlan:
    """The per-row part of the plan: `token_layout` and each row's page."""
    seq, pos, valid = token_layout(md, num_tokens)
    return AttentionPlan(seq, pos, valid, md.page_indices[seq, pos // page_size], kernel)


def kv_cache_shape(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple:
    """Shape of the KV cache array for the given model and page pool."""
    return (num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim)
