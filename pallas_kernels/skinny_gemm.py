"""GEMMs of few rows (`x [T, K] @ w[layer] [K, N]`, T a decode step's tokens) as a Mosaic GPU kernel that
streams one layer of a stacked weight `[L, K, N]` in place.

At T <= 64 a projection is a weight read: 2 bytes a weight, 2T FLOPs. The kernel is written for that
bound. Each CUDA block owns `tile_n` output columns and one of `splits` ranges of K; TMA streams its weight
tiles `[tile_k, tile_n]` (and the matching `[T, tile_k]` columns of x, from L2) through `num_stages` shared
memory stages. The tensor cores take the tile transposed ("swap AB"): `out^T [tile_n, T] += w^T x^T`, so a
weight column is the wgmma's M = 64 row and the T tokens its N, and no row of x is padded to 64. The splits'
float32 partials are summed in XLA, where the sum fuses into whatever reads the projection.

The weight's layer is a kernel argument, not a slice: sliced outside, XLA would copy the layer's weights into
a buffer of their own before every call (it reads them in place only for its own GEMMs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MAX_ROWS = 64  # rows of x the kernel takes (the wgmma's N); more rows are XLA's
_TMA_ROWS = 8  # x's rows are padded to whole 8-row shared-memory tiles
_NUM_SMS = 132  # H100 SXM; sizes the split heuristic
_SMEM_BUDGET = 200 * 1024
_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True)
class GemmSizes:
    """Output columns per block, K per pipeline step, steps in flight, and K ranges (None: the fewest that give
    every SM two blocks). The defaults were the fastest for every Llama-3.1-8B projection at 16 rows on an
    H100 (`benchmarks/skinny_gemm.py`): small tiles and few stages, so that many blocks share each SM."""

    tile_n: int = 64
    tile_k: int = 64
    num_stages: int = 2
    splits: int | None = None


@dataclasses.dataclass(frozen=True)
class _Shapes:
    rows: int  # x's rows, padded to a multiple of 8
    k: int
    n: int
    tile_n: int
    tile_k: int
    num_stages: int
    splits: int

    @property
    def steps(self) -> int:
        """K steps of one block."""
        return self.k // self.splits // self.tile_k


def supported(x_shape: tuple[int, ...], w_shape: tuple[int, ...], dtype) -> bool:
    """Whether `skinny_matmul` takes these operands: 16-bit, at most 64 rows, K and N multiples of 64."""
    (t, k), (_, k2, n) = x_shape, w_shape
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and t <= MAX_ROWS
            and k == k2 and k % 64 == 0 and n % 64 == 0)


def skinny_matmul(x: jax.Array, w: jax.Array, layer, sizes: GemmSizes | None = None,
                  out_dtype=None) -> jax.Array:
    """`x [T, K] @ w[layer]` for a stacked weight `w [L, K, N]`, as `[T, N]` in `out_dtype` (x's by default)."""
    if not supported(x.shape, w.shape, x.dtype) or x.dtype != w.dtype:
        raise NotImplementedError(f"skinny_matmul needs 16-bit x [T <= {MAX_ROWS}, K] and w [L, K, N] of one dtype "
                                  f"with K and N multiples of 64, got {x.shape} {x.dtype} and {w.shape} {w.dtype}")
    shapes = _plan(x.shape[0], w.shape[1], w.shape[2], sizes or GemmSizes(), x.dtype)
    rows = jnp.pad(x, ((0, shapes.rows - x.shape[0]), (0, 0))) if shapes.rows != x.shape[0] else x
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    partials = _call_kernel(layer, rows, w, shapes)  # [splits, N, rows] float32
    return partials.sum(axis=0)[:, : x.shape[0]].T.astype(out_dtype or x.dtype)


def _plan(t: int, k: int, n: int, sizes: GemmSizes, dtype) -> _Shapes:
    """Tiles that divide the operands, and splits of K that give every SM about two blocks."""
    tile_n = min(sizes.tile_n, n) if n % min(sizes.tile_n, n) == 0 else 64
    tile_k = sizes.tile_k if k % sizes.tile_k == 0 else 64
    k_steps = k // tile_k
    splits = sizes.splits or _fill_splits(n // tile_n, k_steps)
    if k_steps % splits:
        raise ValueError(f"skinny_matmul: {splits} splits do not divide {k_steps} K steps of {tile_k}")
    rows = -(-t // _TMA_ROWS) * _TMA_ROWS
    stages = max(1, min(sizes.num_stages, k_steps // splits))
    item = jnp.dtype(dtype).itemsize
    while stages > 2 and stages * (tile_k * tile_n + rows * tile_k) * item > _SMEM_BUDGET:
        stages -= 1
    return _Shapes(rows, k, n, tile_n, tile_k, stages, splits)


def _fill_splits(col_blocks: int, k_steps: int) -> int:
    """The fewest splits of K (a divisor of its steps) giving at least two blocks an SM."""
    for splits in range(1, k_steps + 1):
        if k_steps % splits == 0 and col_blocks * splits >= 2 * _NUM_SMS:
            return splits
    return k_steps


def _call_kernel(layer, x, w, shapes: _Shapes) -> jax.Array:
    dt, stages = x.dtype, shapes.num_stages
    scratch = [
        plgpu.SMEM((stages, shapes.tile_k, shapes.tile_n), dt, transforms=_transforms(dt, shapes.tile_n)),
        plgpu.SMEM((stages, shapes.rows, shapes.tile_k), dt, transforms=_transforms(dt, shapes.tile_k)),
        plgpu.SMEM((shapes.tile_n, shapes.rows), jnp.float32, transforms=_transforms(jnp.float32, shapes.rows)),
        plgpu.Barrier(num_arrivals=2, num_barriers=shapes.num_stages),
    ]
    with _interpret_off_gpu():
        return plgpu.kernel(
            functools.partial(_kernel, shapes=shapes),
            out_type=jax.ShapeDtypeStruct((shapes.splits, shapes.n, shapes.rows), jnp.float32),
            scratch_types=scratch, grid=(shapes.n // shapes.tile_n, shapes.splits), grid_names=("cols", "splits"),
            compiler_params=_COMPILER_PARAMS,
        )(layer, x, w)


def _kernel(layer_ref, x_ref, w_ref, out_ref, w_smem, x_smem, out_smem, barriers, *, shapes: _Shapes):
    col, part = lax.axis_index("cols"), lax.axis_index("splits")
    first_step = part * shapes.steps
    cols = pl.ds(col * shapes.tile_n, shapes.tile_n)
    layer = layer_ref[0]

    def fetch(step):
        stage = lax.rem(step, shapes.num_stages)
        ks = pl.ds((first_step + step) * shapes.tile_k, shapes.tile_k)
        plgpu.copy_gmem_to_smem(w_ref.at[layer, ks, cols], w_smem.at[stage], barriers.at[stage])
        plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[stage], barriers.at[stage])

    for step in range(min(shapes.num_stages, shapes.steps)):
        fetch(step)

    def accumulate(acc_ref):
        def step(j, carry):
            stage = lax.rem(j, shapes.num_stages)
            plgpu.barrier_wait(barriers.at[stage])
            plgpu.wgmma(acc_ref, w_smem.at[stage].transpose((1, 0)), x_smem.at[stage].transpose((1, 0)))
            plgpu.wgmma_wait(0)
            pl.when(j + shapes.num_stages < shapes.steps)(lambda: fetch(j + shapes.num_stages))
            return carry

        lax.fori_loop(0, shapes.steps, step, 0)
        return acc_ref[...]

    out_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((shapes.tile_n, shapes.rows), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[part, cols])
    plgpu.wait_smem_to_gmem(0)


def _transforms(dtype, minor: int) -> tuple:
    """Shared-memory tiles of 8 rows of up to 128 bytes, swizzled, as TMA writes and wgmma reads them."""
    swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
    return plgpu.TilingTransform((_TMA_ROWS, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _interpret_off_gpu():
    """Mosaic GPU compiles only for NVIDIA GPUs; everywhere else JAX's GPU interpreter runs the kernel."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    return plgpu.force_gpu_interpret_mode()
