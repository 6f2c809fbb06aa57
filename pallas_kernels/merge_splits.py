"""The Mosaic GPU attention kernel's KV splits merged, and each token's rows picked out of their tiles, as one Pallas
Triton kernel.

Why: a step of few sequences splits each context over several CUDA blocks (flash-decoding), whose partial outputs
are merged by their log-sum-exps. In XLA that was two kernels a layer (the splits' weights from the LSEs, then the
weighted sum gathered back to `[T, H, D]`), about 3.6 us and a gap at batch 1 on an H100 at Llama-3.1-8B shape
(docs/performance.md, session 16). Program (t, h) merges token t's G query rows of KV head h over its tile's
splits, as many as the step gave the tile: at most `FEW_SPLITS` read one by one, more through one masked load of a
window of splits a row. Padding tokens get zeros, as in the reference.

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

# Splits read one by one, unrolled, where a tile has no more: on an H100 that took 1.9-2.3 us a layer at 3-4 splits,
# where the masked load of a whole window took 3.2-3.6 at any count (docs/performance.md, session 18)
FEW_SPLITS = 4


def supported(head_dim: int) -> bool:
    """Whether `merge_splits` takes this head dim: a power of two (Triton's blocks)."""
    return head_dim & (head_dim - 1) == 0


def window(max_splits: int) -> int:
    """Split rows the merge reads for every tile, whatever its own count (masked past it): the power of two at or
    above `max_splits`. The kernel's output needs this many rows of room past its last block's."""
    return 1 << (max_splits - 1).bit_length()


def merge_splits(out: jax.Array, lse: jax.Array, tokens: jax.Array, group: int, dtype,
                 splits_of: Callable[[jax.Array, jax.Array], jax.Array], max_splits: int) -> jax.Array:
    """`[T, KVH * G, D]` in `dtype`: for each real token, `sum_s w_s out_s / sum_s w_s` over the splits of its rows,
    `w_s = 2^lse_s` (log2 units, as the kernel writes them). `out [KVH, W, 64, D]`, `lse [KVH, W, 64]`: the
    kernel's blocks in order, in which tile t's n splits are blocks `t * n` to `t * n + n - 1`, and `window(
    max_splits)` rows of room past the last. `tokens [T, 5]`: each token's tile, its first row in the tile (its G
    rows follow), 1 for a real token (0 for padding), and the step's tiles and longest context, from which
    `splits_of` gives n (at most `max_splits`)."""
    num_kv_heads, _, _, head_dim = out.shape
    if not supported(head_dim):
        raise NotImplementedError(f"merge_splits needs a head dim that is a power of two, got {head_dim}")
    width, few = window(max_splits), min(FEW_SPLITS, max_splits)

    def kernel(tokens_ref, out_ref, lse_ref, merged_ref):
        t, h = pl.program_id(0), pl.program_id(1)
        tile, first, real = tokens_ref[t, 0], tokens_ref[t, 1], tokens_ref[t, 2]
        splits = splits_of(tokens_ref[t, 3], tokens_ref[t, 4])
        rows = [first + g for g in range(group)]

        def store(merged: list[jax.Array]) -> None:
            for g in range(group):
                merged_ref[t, h * group + g, :] = merged[g].astype(merged_ref.dtype)

        # Every load before any store, so that their latencies overlap (Triton keeps loads after a store that may
        # alias them): loads between the rows' stores made the kernel 3.5 us on an H100.
        @pl.when((real != 0) & (splits <= few))
        def _few():
            # Blocks past the tile's splits read its last again, at weight zero.
            blocks = [tile * splits + jnp.minimum(s, splits - 1) for s in range(few)]
            parts = [[out_ref[h, b, row, :] for b in blocks] for row in rows]
            weights = [[jnp.where(s < splits, lse_ref[h, b, row], -jnp.inf) for s, b in enumerate(blocks)]
                       for row in rows]
            store([_merged_few(p, w) for p, w in zip(parts, weights)])

        if max_splits > few:
            @pl.when((real != 0) & (splits > few))
            def _many():
                # One masked load of the whole window a row.
                blocks = pl.ds(tile * splits, width)
                live = lax.broadcasted_iota(jnp.int32, (width,), 0) < splits
                weights = [pltriton.load(lse_ref.at[h, blocks, row], mask=live, other=-jnp.inf) for row in rows]
                mask = jnp.broadcast_to(live[:, None], (width, head_dim))
                parts = [pltriton.load(out_ref.at[h, blocks, row, :], mask=mask, other=0.0) for row in rows]
                store([_merged(p, w) for p, w in zip(parts, weights)])

        @pl.when(real == 0)
        def _padding():
            for g in range(group):
                merged_ref[t, h * group + g, :] = jnp.zeros((head_dim,), merged_ref.dtype)

    return pl.pallas_call(
        kernel, grid=(tokens.shape[0], num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((tokens.shape[0], num_kv_heads * group, head_dim), dtype),
        # a program holds G rows of `width` splits of D values (4 x 16 x 128 at Llama-3-8B's shape in the
        # smallest decode bucket): too many registers for one warp
        compiler_params=pltriton.CompilerParams(num_warps=1 if width <= FEW_SPLITS else 4, num_stages=1),
        interpret=jax.default_backend() != "gpu", name="merge_splits",
    )(tokens, out, lse)


def _merged(parts: jax.Array, weights: jax.Array) -> jax.Array:
    """`sum_s 2^w_s part_s / sum_s 2^w_s` in float32 over `parts [S, D]`, `weights [S]`, with the largest weight
    subtracted first (XLA's merge). A row no split saw (no finite weight) is measured from 0, as in XLA's."""
    scaled = jnp.exp2(weights - _finite(jnp.max(weights)))
    total = jnp.sum(scaled[:, None] * parts.astype(jnp.float32), axis=0)
    return total / jnp.maximum(jnp.sum(scaled), 1e-30)


def _merged_few(parts: list[jax.Array], weights: list[jax.Array]) -> jax.Array:
    """`_merged` of splits held one by one (Triton stacks no more than two arrays)."""
    top = weights[0]
    for w in weights[1:]:
        top = jnp.maximum(top, w)
    scaled = [jnp.exp2(w - _finite(top)) for w in weights]
    total = sum(w * p.astype(jnp.float32) for w, p in zip(scaled, parts))
    return total / jnp.maximum(sum(scaled), 1e-30)


def _finite(top: jax.Array) -> jax.Array:
    """The largest weight, or 0 where it is not finite (a row no split saw)."""
    return jnp.where(jnp.abs(top) < jnp.inf, top, 0.0)
