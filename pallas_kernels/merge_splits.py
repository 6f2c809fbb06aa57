"""The Mosaic GPU attention kernel's KV splits merged, and each token's rows picked out of their tiles, as one Pallas
Triton kernel.

Why: a step of few sequences splits each context over several CUDA blocks (flash-decoding), whose partial outputs
are merged by their log-sum-exps. In XLA that was two kernels a layer (the splits' weights from the LSEs, then the
weighted sum gathered back to `[T, H, D]`), about 3.6 us and a gap at batch 1 on an H100 at Llama-3.1-8B shape
(docs/performance.md, session 16). Program (t, h) merges token t's G query rows of KV head h; padding tokens get
zeros, as in the reference.

JAX 0.11.2, which jaxllm pins, marks its Pallas Triton backend deprecated in favour of Mosaic GPU: like
`norm_gate_up`, this kernel is due a Mosaic GPU port before JAX is upgraded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NUM_WARPS = 1  # a program moves a few rows of at most 128 values


def supported(head_dim: int) -> bool:
    """Whether `merge_splits` takes this head dim: a power of two (Triton's blocks)."""
    return head_dim & (head_dim - 1) == 0


def merge_splits(out: jax.Array, lse: jax.Array, tokens: jax.Array, group: int, dtype) -> jax.Array:
    """`[T, KVH * G, D]` in `dtype`: for each real token, `sum_s w_s out_s / sum_s w_s` over the splits of its rows,
    `w_s = 2^lse_s` (log2 units, as the kernel writes them). `out [splits, KVH, tiles, 64, D]`, `lse [splits, KVH,
    tiles, 64]`, `tokens [T, 3]`: each token's tile, its first row in the tile (its G rows follow), and 1 for a
    real token, 0 for padding."""
    num_splits, num_kv_heads, _, _, head_dim = out.shape
    if not supported(head_dim):
        raise NotImplementedError(f"merge_splits needs a head dim that is a power of two, got {head_dim}")

    def kernel(tokens_ref, out_ref, lse_ref, merged_ref):
        t, h = pl.program_id(0), pl.program_id(1)
        tile, first, real = tokens_ref[t, 0], tokens_ref[t, 1], tokens_ref[t, 2]

        @pl.when(real != 0)
        def _merge():
            # Every load before any store, so that their latencies overlap (Triton keeps loads after a store that
            # may alias them): loads between the rows' stores made the kernel 3.5 us on an H100.
            rows = [first + g for g in range(group)]
            parts = [[out_ref[s, h, tile, row, :] for s in range(num_splits)] for row in rows]
            weights = [[lse_ref[s, h, tile, row] for s in range(num_splits)] for row in rows]
            for g in range(group):
                merged_ref[t, h * group + g, :] = _merged(parts[g], weights[g]).astype(merged_ref.dtype)

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


def _merged(parts: list[jax.Array], weights: list[jax.Array]) -> jax.Array:
    """`sum_s 2^w_s part_s / sum_s 2^w_s` in float32, with the largest weight subtracted first (XLA's merge)."""
    top = weights[0]
    for w in weights[1:]:
        top = jnp.maximum(top, w)
    top = jnp.where(jnp.abs(top) < jnp.inf, top, 0.0)  # not finite (a row no split saw): 0, as in XLA's
    scaled = [jnp.exp2(w - top) for w in weights]
    total = sum(w * p.astype(jnp.float32) for w, p in zip(scaled, parts))
    return total / jnp.maximum(sum(scaled), 1e-30)
