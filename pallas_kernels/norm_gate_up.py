"""A decoder layer's post-attention RMSNorm, gate/up projection and SiLU-times-up for steps of few rows, as one
Pallas Triton kernel that reads one layer of the stacked `gate_up` weight in place.

Why: at batch 1 the three are three kernels (XLA's norm fusion, cuBLAS's GEMM, XLA's SiLU fusion) around a 235 MB
weight read at Llama-3.1-8B shape. In one kernel the norm is a row scale applied to the products (`rms_norm(x) @ W
== r * (x @ W)` with `r = rsqrt(mean(x^2) + eps)` per row, the norm's scale already folded into W by
`DecoderLayer.fold_norm_scales`), from sums of squares taken as x is read, and SiLU-times-up is the epilogue. On
an H100 the layer's MLP half took 124.6 / 124.0 us at 1 / 16 rows against 126.4 / 128.5 for the three kernels
and cuBLAS's down GEMM (`python benchmarks/fused_mlp.py --norm --rows 1 16`), and a batch-1 token's TPOT went from
6.34 to 6.10-6.15 ms (docs/performance.md, session 15). Each program owns `block_i` intermediate columns and reads
their gate and up columns over all of K, so no partial sums leave it and the result does not depend on scheduling.

JAX 0.11.2, which jaxllm pins, marks its Pallas Triton backend deprecated in favour of Mosaic GPU: this kernel is
due a Mosaic GPU port before JAX is upgraded.

Only the rounding differs from the three kernels: the products use x itself, not x normalized and rounded to x's
dtype, and the norm is applied in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_ROWS = 16  # x's rows are padded to 16, the tensor cores' smallest M; more rows go to XLA's three kernels


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Intermediate columns a program owns, K a loop step, warps, pipelined steps: the fastest at Llama-3.1-8B
    shape on an H100 (`benchmarks/fused_mlp.py --norm`). Smaller powers of two are taken where these do not
    divide the model's sizes."""

    block_i: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


def supported(rows: int, gate_up_shape: tuple[int, ...], dtype) -> bool:
    """Whether `norm_gate_up` takes these operands: 16-bit, at most 16 rows, a stacked `[L, E, 2, I]` weight whose
    E and I are multiples of 16."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and rows <= MAX_ROWS
            and len(gate_up_shape) == 4 and gate_up_shape[2] == 2 and gate_up_shape[1] % 16 == 0
            and gate_up_shape[3] % 16 == 0)


def norm_gate_up(x: jax.Array, gate_up: jax.Array, layer, eps: float, sizes: Sizes | None = None) -> jax.Array:
    """`silu(g) * u` for `[g, u] = rms_norm(x) @ gate_up[layer]`: `x [T, E]`, `gate_up [L, E, 2, I]` (gate, then up,
    on the third axis), as `[T, I]` in x's dtype."""
    if not supported(x.shape[0], gate_up.shape, x.dtype) or x.dtype != gate_up.dtype:
        raise NotImplementedError(f"norm_gate_up needs 16-bit x [T <= {MAX_ROWS}, E] and gate_up [L, E, 2, I] of "
                                  f"one dtype, E and I multiples of 16; got {x.shape} {x.dtype} and "
                                  f"{gate_up.shape} {gate_up.dtype}")
    rows, embed = x.shape
    inter = gate_up.shape[3]
    sizes = sizes or Sizes()
    block_i, block_k = _divisor(sizes.block_i, inter), _divisor(sizes.block_k, embed)
    padded = jnp.pad(x, ((0, MAX_ROWS - rows), (0, 0))) if rows < MAX_ROWS else x

    def kernel(layer_ref, x_ref, w_ref, out_ref):
        cols = pl.ds(pl.multiple_of(pl.program_id(0) * block_i, block_i), block_i)
        index = layer_ref[0]

        def step(i, carry):
            gate, up, squares = carry
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            xb = x_ref[:, ks]
            xf = xb.astype(jnp.float32)
            gate = gate + jnp.dot(xb, w_ref[index, ks, 0, cols], preferred_element_type=jnp.float32)
            up = up + jnp.dot(xb, w_ref[index, ks, 1, cols], preferred_element_type=jnp.float32)
            return gate, up, squares + jnp.sum(xf * xf, axis=1, keepdims=True)

        zero = jnp.zeros((MAX_ROWS, block_i), jnp.float32)
        gate, up, squares = lax.fori_loop(0, embed // block_k, step,
                                          (zero, zero, jnp.zeros((MAX_ROWS, 1), jnp.float32)))
        scale = lax.rsqrt(squares / embed + eps)
        gate, up = gate * scale, up * scale
        out_ref[:, cols] = (gate * jax.nn.sigmoid(gate) * up).astype(out_ref.dtype)

    out = pl.pallas_call(
        kernel, grid=(inter // block_i,), out_shape=jax.ShapeDtypeStruct((MAX_ROWS, inter), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages),
        interpret=jax.default_backend() != "gpu", name="norm_gate_up",
    )(jnp.asarray(layer, jnp.int32).reshape(1), padded, gate_up)
    return out[:rows]


def _divisor(block: int, size: int) -> int:
    """The largest power of two at most `block` (and at least 16) that divides `size`."""
    while block > 16 and size % block:
        block //= 2
    return block
