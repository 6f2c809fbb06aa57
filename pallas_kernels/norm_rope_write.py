"""What lies between a decoder layer's q/k/v GEMM and its attention kernel, as one Pallas Triton kernel: the input
RMSNorm (as a row scale), RoPE on q and k, the queries' regrouping into the Mosaic GPU attention kernel's layout,
and the K/V write into the paged cache (in place).

Why: at batch 1 these were three XLA kernels a layer (the norm before the GEMM, RoPE with the regrouping, RoPE on
k with the cache scatter), about 8 us of kernels and 1.8 of gaps on an H100 at Llama-3.1-8B shape
(docs/performance.md, session 15's layer table) for a few kilobytes of work. The norm moves after the GEMM as a row
scale (`rms_norm(x) @ W == r * (x @ W)`, `r = rsqrt(mean(x^2) + eps)`, the norm's learned scale folded into W by
`DecoderLayer.fold_norm_scales`), which the kernel takes from x while it rotates; V gets the same scale.

Program (t, h) handles token t's KV head h: its G query heads go to rows `q_dest[t] + g` of
`[KVH, num_rows, D]`, its K and V to `cache[layer, page[t], slot[t], 2h / 2h + 1]`. Padding tokens write nothing,
and grouped rows no token maps to are left as they are: each row of the attention kernel's tiles is computed from
its own query row alone, and it never reads back the outputs of those rows.

JAX 0.11.2, which jaxllm pins, marks its Pallas Triton backend deprecated in favour of Mosaic GPU: like
`norm_gate_up`, this kernel is due a Mosaic GPU port before JAX is upgraded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.reference import to_cache_dtype

_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_8BIT_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_NUM_WARPS = 4


def supported(x_dtype, cache_dtype, head_dim: int, cache_format: str | None = None) -> bool:
    """Whether `norm_rope_write` takes these operands: 16-bit activations, a cache of their dtype or of 8-bit float
    bytes (`cache_format`, as `reference.cache_values` stores them), an even head dim whose half is a power of two
    (Triton's blocks)."""
    half = head_dim // 2
    cache_8bit = jnp.dtype(cache_dtype) == jnp.dtype(jnp.uint8) and cache_format in _8BIT_FORMATS
    same = jnp.dtype(cache_dtype) == jnp.dtype(x_dtype) and cache_format is None
    return (jnp.dtype(x_dtype) in _SIXTEEN_BIT and (same or cache_8bit) and head_dim % 2 == 0
            and half & (half - 1) == 0)


def norm_rope_write(x: jax.Array, qkv: jax.Array, rope: tuple[jax.Array, jax.Array], kv_cache: jax.Array,
                    layer, table: jax.Array, num_rows: int, eps: float,
                    cache_format: str | None = None) -> tuple[jax.Array, jax.Array]:
    """`(q_rows [KVH, num_rows, D], kv_cache')` from `x [T, E]` (the layer's input, not normalized), `qkv = x @ W`
    as `[T, KVH, G + 2, D]` (each KV head's G query heads, then its k and v), RoPE's `(cos, sin)` `[T, 1, D/2]`
    and `table [T, 4]`: each token's cache page, slot in the page, first grouped query row, and whether it is
    real (1) or padding (0). The cache `[L, pages, page_size, 2 * KVH, D]` is updated in place when donated;
    `cache_format`: the 8-bit float type a byte cache holds (K/V rounded to x's dtype, then saturated to it, as
    `reference.to_cache_dtype` writes them)."""
    num_tokens, embed = x.shape
    _, num_kv_heads, width, head_dim = qkv.shape
    if not supported(x.dtype, kv_cache.dtype, head_dim, cache_format) or qkv.dtype != x.dtype:
        raise NotImplementedError(f"norm_rope_write needs 16-bit x and qkv, a cache of that dtype or of 8-bit float "
                                  f"bytes, and a head dim of twice a power of two; got x {x.dtype}, qkv {qkv.shape} "
                                  f"{qkv.dtype}, cache {kv_cache.dtype} (cache_format {cache_format})")
    group, half = width - 2, head_dim // 2
    block_e = _divisor(4096, embed)

    def kernel(layer_ref, table_ref, x_ref, qkv_ref, cos_ref, sin_ref, _, q_ref, cache_ref):
        t, h = pl.program_id(0), pl.program_id(1)

        @pl.when(table_ref[t, 3] != 0)
        def _token():
            # Every load first and independent of the others (the norm's chunks unrolled, not a loop), so that their
            # latencies overlap: a loop over x's chunks made the kernel 4.4 us on an H100 at Llama-3.1-8B shape.
            rows = [[qkv_ref[t, h, j, pl.ds(i * half, half)] for i in range(2)] for j in range(width)]
            cos, sin = cos_ref[t, 0, :], sin_ref[t, 0, :]
            chunks = [x_ref[t, pl.ds(i * block_e, block_e)].astype(jnp.float32) for i in range(embed // block_e)]
            scale = lax.rsqrt(sum(jnp.sum(c * c) for c in chunks) / embed + eps)
            a_b = [[part.astype(jnp.float32) * scale for part in row] for row in rows]

            def rotated(j: int) -> tuple[jax.Array, jax.Array]:
                a, b = a_b[j]
                return a * cos - b * sin, b * cos + a * sin

            def store(ref, index: tuple, halves: tuple[jax.Array, jax.Array], convert) -> None:
                for i, value in enumerate(halves):
                    ref[(*index, pl.ds(i * half, half))] = convert(value)

            first = table_ref[t, 2]
            for g in range(group):
                store(q_ref, (h, first + g), rotated(g), lambda v: v.astype(q_ref.dtype))
            where = (layer_ref[0], table_ref[t, 0], table_ref[t, 1])
            entries = _entries(x.dtype, cache_format)
            store(cache_ref, (*where, 2 * h), rotated(group), entries)
            store(cache_ref, (*where, 2 * h + 1), a_b[group + 1], entries)

    return pl.pallas_call(
        kernel, grid=(num_tokens, num_kv_heads),
        out_shape=(jax.ShapeDtypeStruct((num_kv_heads, num_rows, head_dim), x.dtype),
                   jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)),
        input_output_aliases={6: 1}, compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=jax.default_backend() != "gpu", name="norm_rope_write",
    )(jnp.asarray(layer, jnp.int32).reshape(1), table, x, qkv, *rope, kv_cache)


def _entries(dtype, cache_format: str | None):
    """float32 K/V -> the cache's entries: `dtype`, or rounded to it and saturated to the 8-bit `cache_format`,
    as bytes."""
    if cache_format is None:
        return lambda value: value.astype(dtype)
    return lambda value: lax.bitcast_convert_type(
        to_cache_dtype(value.astype(dtype).astype(jnp.float32), cache_format), jnp.uint8)


def _divisor(block: int, size: int) -> int:
    """The largest power of two at most `block` that divides `size` (x's chunks: 4096 keeps them few)."""
    while size % block:
        block //= 2
    return block
