"""The Mosaic GPU attention kernel's KV splits merged, and each token's rows picked out of their tiles, as one Pallas
Triton kernel.

Why: a step of few sequences splits each context over several CUDA blocks (flash-decoding), whose partial outputs
are merged by their log-sum-exps. In XLA that was two kernels a layer (the splits' weights from the LSEs, then the
weighted sum gathered back to `[T, H, D]`), about 3.6 us and a gap at batch 1 on an H100 at Llama-3.1-8B shape
(docs/performance.md, session 16). Program (t, h) merges token t's G query rows of KV head h, reading its tile's
splits a chunk at a time (a step chooses how many a tile takes); padding tokens get zeros, as in the reference.

JAX 0.11.2, which jaxllm pins, marks its Pallas Triton backend deprecated in favour of Mosaic GPU: like
`norm_gate_up`, this kernel is due a Mosaic GPU port before JAX is upgraded.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NUM_WARPS = 1  # a program moves a few rows of at most 128 values
# Splits read at once: a step of few sequences may give a tile up to 16, but unrolled over 16 the loads of one
# sequence of 512 tokens (4 splits) cost about 4 us a layer more on an H100 (docs/performance.md, session 17). Each
# further chunk costs about 1.2 us, so the kernel gives a tile of more than this a multiple of it.
SPLITS_AT_ONCE = 4


def supported(head_dim: int) -> bool:
    """Whether `merge_splits` takes this head dim: a power of two (Triton's blocks)."""
    return head_dim & (head_dim - 1) == 0


def merge_splits(out: jax.Array, lse: jax.Array, tokens: jax.Array, group: int, dtype,
                 splits_of: Callable[[jax.Array, jax.Array], jax.Array], max_splits: int) -> jax.Array:
    """`[T, KVH * G, D]` in `dtype`: for each real token, `sum_s w_s out_s / sum_s w_s` over the splits of its rows,
    `w_s = 2^lse_s` (log2 units, as the kernel writes them). `out [S, KVH, tiles, 64, D]`, `lse [S, KVH, tiles,
    64]`: the kernel's (split, tile) block slots, in which tile t's splits are slots `t * n` to `t * n + n - 1`
    (slot `s * tiles + tile`). `tokens [T, 5]`: each token's tile, its first row in the tile (its G rows follow),
    1 for a real token (0 for padding), and the step's tiles and longest context, from which `splits_of` gives n
    (at most `max_splits`)."""
    _, num_kv_heads, num_tiles, _, head_dim = out.shape
    if not supported(head_dim):
        raise NotImplementedError(f"merge_splits needs a head dim that is a power of two, got {head_dim}")

    def kernel(tokens_ref, out_ref, lse_ref, merged_ref):
        t, h = pl.program_id(0), pl.program_id(1)
        tile, first, real = tokens_ref[t, 0], tokens_ref[t, 1], tokens_ref[t, 2]
        splits = splits_of(tokens_ref[t, 3], tokens_ref[t, 4])
        rows = [first + g for g in range(group)]

        def chunk(c, state):
            # The chunk's loads are issued together, so that their latencies overlap; its slots past the tile's
            # splits read the tile's last split again, at weight zero.
            ids = [c * SPLITS_AT_ONCE + i for i in range(SPLITS_AT_ONCE)]
            slots = [tile * splits + jnp.minimum(s, splits - 1) for s in ids]
            where = [(lax.div(w, num_tiles), lax.rem(w, num_tiles)) for w in slots]
            parts = [[out_ref[p, h, q, row, :] for p, q in where] for row in rows]
            weights = [[jnp.where(s < splits, lse_ref[p, h, q, row], -jnp.inf) for s, (p, q) in zip(ids, where)]
                       for row in rows]
            return tuple(_merge_chunk(state[g], parts[g], weights[g]) for g in range(group))

        @pl.when(real != 0)
        def _merge():
            # Every load before any store (Triton keeps loads after a store that may alias them): loads between
            # the rows' stores made the kernel 3.5 us on an H100.
            # The first chunk outside the loop: a tile of at most `SPLITS_AT_ONCE` splits runs no loop at all.
            empty = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
            chunks = lax.div(splits + SPLITS_AT_ONCE - 1, SPLITS_AT_ONCE)
            merged = lax.fori_loop(1, chunks, chunk, chunk(0, (empty,) * group))
            for g, (_, total, acc) in enumerate(merged):
                merged_ref[t, h * group + g, :] = (acc / jnp.maximum(total, 1e-30)).astype(merged_ref.dtype)

        @pl.when(real == 0)
        def _padding():
            for g in range(group):
                merged_ref[t, h * group + g, :] = jnp.zeros((head_dim,), merged_ref.dtype)

    return pl.pallas_call(
        kernel, grid=(tokens.shape[0], num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((tokens.shape[0], num_kv_heads * group, head_dim), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=jax.default_backend() != "gpu", name="merge_splits",
    )(tokens, out, lse)


def _merge_chunk(state: tuple[jax.Array, jax.Array, jax.Array], parts: list[jax.Array],
                 weights: list[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chunk of splits folded into a row's running `(top, sum_s 2^(w_s - top), sum_s 2^(w_s - top) part_s)`
    in float32, the largest weight seen so far subtracted first (XLA's merge, taken online). A top that is not
    finite (no split so far saw the row) is measured from 0, as in XLA's."""
    top, total, acc = state
    for w in weights:
        top = jnp.maximum(top, w)
    base = jnp.where(jnp.abs(top) < jnp.inf, top, 0.0)
    keep = jnp.exp2(state[0] - base)
    scaled = [jnp.exp2(w - base) for w in weights]
    total = total * keep + sum(scaled)
    acc = acc * keep + sum(w * p.astype(jnp.float32) for w, p in zip(scaled, parts))
    return top, total, acc
