"""FP8 GEMMs of few rows (`xq [T, K] @ w[layer]^T`, `w [L, N, K]` float8_e4m3fn) as a Mosaic GPU kernel that
streams one layer of a stacked weight in place.

Why a kernel: XLA sends FP8 products to cuBLASLt, and cuBLASLt's FP8 call cannot take a slice of the stacked
layer weights where it lies, so inside the model's layer loop XLA copied every layer's weights before each
GEMM (4.8 ms of copies per batch-1 token at Llama-3.1-8B shape on an H100, more than the 8-bit weights saved).
Here the layer is a kernel argument, as the attention kernel takes its cache layer.

At T <= 256 a projection is mostly a weight read: one byte a weight, 2T FLOPs. Each CUDA block owns `tile_n`
output channels and one of `splits` ranges of K; TMA streams weight tiles `[tile_n, 128]` (K minor, the layout
FP8 wgmma needs for both operands) and the matching `[T, 128]` columns of x through `num_stages` shared-memory
stages, and the tensor cores compute `out [T, tile_n] += x w^T` with x's rows padded to a multiple of 64 (the
wgmma's M). The padding costs arithmetic the weight stream hides; only x's own rows of the output are written,
row-major. The epilogue applies x's row scales and the layer's channel scales, so with one K split the kernel
writes the model's dtype and nothing is left for XLA; with more, XLA sums the splits' scaled float32 partials.
More than 128 rows of a wide projection go to two consumer warpgroups of 128 rows each, with 128-channel tiles
(by arithmetic a 64-channel FP8 wgmma reads shared memory as fast as an SM supplies it, a 128-channel one at
three quarters of that). Computing the tile transposed instead (weight channels as M) left XLA a `[N, T]`
transpose per GEMM that took longer than the GEMM's own weight read on an H100. Both operands are 128-byte
swizzled rows of 128 FP8 values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import _interpret_off_gpu, _transforms

MAX_ROWS = 256  # rows of x the kernel takes (the wgmma's N, at most 256); more rows are XLA's
_TMA_ROWS = 8  # rows of one swizzled shared-memory tile
_WGMMA_M = 64  # x's rows are padded to a multiple of the wgmma's M
_TILE_K = 128  # K per pipeline step: one 128-byte swizzled row of FP8 values
_NUM_SMS = 132  # H100 SXM; sizes the split heuristic
_SMEM_BUDGET = 200 * 1024
_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)
FP8 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class GemmSizes:
    """Output channels per block, steps in flight, K ranges (None: about one block an SM), and consumer warpgroups
    (None: `_warpgroups`)."""

    tile_n: int = 128
    num_stages: int = 4
    splits: int | None = None
    warpgroups: int | None = None


@dataclasses.dataclass(frozen=True)
class _Shapes:
    rows: int  # the wgmma's rows: x's, padded to a multiple of 64
    in_rows: int  # the rows of x and of its scales loaded: `padded_rows`
    out_rows: int  # the output rows written: x's rows padded to 8 (one TMA tile)
    k: int
    n: int
    tile_n: int
    num_stages: int
    splits: int
    warpgroups: int

    @property
    def wg_rows(self) -> int:
        """The rows of one warpgroup's accumulator."""
        return self.rows // self.warpgroups

    @property
    def steps(self) -> int:
        """K steps of one block."""
        return self.k // self.splits // _TILE_K


def supported(rows: int, w_shape: tuple[int, ...]) -> bool:
    """Whether `fp8_matmul` takes a `[rows, K]` input and a stacked `[L, N, K]` weight: at most MAX_ROWS rows,
    K a multiple of 128 and N of 64."""
    _, n, k = w_shape
    return rows <= MAX_ROWS and k % _TILE_K == 0 and n % 64 == 0


def padded_rows(t: int) -> int:
    """The rows of x (and of its scales) the kernel reads for `t` rows: the next multiple of 32 (Mosaic's copies
    move a multiple of 128 bytes, 32 float32 scales). Padding x to this before quantizing it lets XLA pad it in the
    quantization's own kernels (padding the scales after cost a kernel per GEMM). In shared memory the rows are the
    wgmma's M (a multiple of 64); those past x's padded rows are never loaded, and their products never written."""
    return -(-t // 32) * 32


def fp8_matmul(xq: jax.Array, w: jax.Array, layer, sizes: GemmSizes | None = None, *, x_scale: jax.Array | None = None,
               w_scale: jax.Array | None = None, out_dtype=jnp.float32, num_rows: int | None = None) -> jax.Array:
    """`(xq [T, K] * x_scale) @ (w[layer] * w_scale[layer])^T` for float8 operands and a stacked weight `w [L, N, K]`:
    `[num_rows, N]` in `out_dtype`. The float32 scales (one a row of x, `[T]` or `[T, 1]`; one an output channel of
    each layer, `[L, N]`; None: 1) are applied by the kernel, so that with one K split it writes `out_dtype` itself;
    with more, XLA sums the splits' float32 partials. `num_rows` (default T): x's own rows, the ones computed and
    returned; rows past them are padding (see `padded_rows`)."""
    t = xq.shape[0] if num_rows is None else num_rows
    if (xq.dtype != FP8 or w.dtype != FP8 or not supported(t, w.shape) or xq.shape[1] != w.shape[2]
            or not t <= xq.shape[0] <= padded_rows(t)):
        raise NotImplementedError(f"fp8_matmul needs float8_e4m3fn x [T <= {MAX_ROWS}, K] and w [L, N, K] with K a "
                                  f"multiple of {_TILE_K} and N of 64, got {xq.shape} {xq.dtype} and {w.shape} "
                                  f"{w.dtype} ({t} rows of x)")
    x_scale = (jnp.ones((xq.shape[0],), jnp.float32) if x_scale is None
               else x_scale.reshape(xq.shape[0]).astype(jnp.float32))
    w_scale = jnp.ones(w.shape[:2], jnp.float32) if w_scale is None else w_scale.astype(jnp.float32)
    if w_scale.shape != w.shape[:2]:
        raise ValueError(f"fp8_matmul: w_scale must be [L, N] = {w.shape[:2]}, got {w_scale.shape}")
    shapes = _plan(t, w.shape[2], w.shape[1], sizes or GemmSizes())
    if xq.shape[0] != shapes.in_rows:
        pad = shapes.in_rows - xq.shape[0]
        xq, x_scale = jnp.pad(xq, ((0, pad), (0, 0))), jnp.pad(x_scale, (0, pad))
    written = jnp.dtype(out_dtype) if shapes.splits == 1 else jnp.dtype(jnp.float32)
    partials = _call_kernel(jnp.asarray(layer, jnp.int32).reshape(1), xq, x_scale, w, w_scale, shapes, written)
    if shapes.splits == 1:
        return partials[0, :t]
    return partials[:, :t].sum(axis=0).astype(out_dtype)


def _plan(t: int, k: int, n: int, sizes: GemmSizes) -> _Shapes:
    """Tiles that divide the operands and fit the registers, and splits of K that give every SM a block."""
    k_steps = k // _TILE_K
    warpgroups = sizes.warpgroups or _warpgroups(t, n, k_steps)
    rows = warpgroups * -(-t // (warpgroups * _WGMMA_M)) * _WGMMA_M
    # A warpgroup's accumulator, wg_rows x tile_n float32, lives in its registers: at most 128 x 128.
    tile_n = min(sizes.tile_n, n, 64 if rows // warpgroups > 128 else n)
    if n % tile_n:
        tile_n = 64
    splits = sizes.splits or _fill_splits(n // tile_n, k_steps)
    if k_steps % splits:
        raise ValueError(f"fp8_matmul: {splits} splits do not divide {k_steps} K steps of {_TILE_K}")
    # The stages and the output tile take turns in shared memory (two scopes).
    stages = max(1, min(sizes.num_stages, k_steps // splits, _SMEM_BUDGET // ((tile_n + rows) * _TILE_K)))
    return _Shapes(rows, padded_rows(t), -(-t // _TMA_ROWS) * _TMA_ROWS, k, n, tile_n, stages, splits, warpgroups)


def _warpgroups(t: int, n: int, k_steps: int) -> int:
    """Two consumer warpgroups, each with half of x's rows and 128-channel tiles, for more than 128 rows of a
    projection wide enough that those tiles alone give about one block an SM; else one (at most 128 rows, or 64-
    channel tiles with K splits). At 256 rows on an H100 (`benchmarks/fp8_gemm.py --sizes warpgroups=1 ...`) two
    took gate/up from 78.5 to 64.9 us; q/k/v, o and down, which need K splits at 128 channels, were 1-3 us slower."""
    wide = n % 128 == 0 and _fill_splits(n // 128, k_steps) == 1
    return 2 if t > 2 * _WGMMA_M and wide else 1


def _fill_splits(col_blocks: int, k_steps: int) -> int:
    """The fewest splits of K (a divisor of its steps) giving about one block an SM (two thirds of the SMs or
    more): the splits' partials cost writes and a sum, and at 16 or 256 rows on an H100 this choice was the
    fastest of 1, 2 and 4 splits for every Llama-3.1-8B projection
    (`benchmarks/fp8_gemm.py --sizes splits=1 splits=2 splits=4`)."""
    for splits in range(1, k_steps + 1):
        if k_steps % splits == 0 and col_blocks * splits * 3 >= 2 * _NUM_SMS:
            return splits
    return k_steps


def _call_kernel(layer, x, x_scale, w, w_scale, shapes: _Shapes, out_dtype) -> jax.Array:
    scratch = [
        plgpu.SMEM((shapes.rows,), jnp.float32),
        plgpu.SMEM((shapes.tile_n,), jnp.float32),
        plgpu.Barrier(num_arrivals=2),
    ]
    with _interpret_off_gpu():
        return plgpu.kernel(
            functools.partial(_kernel, shapes=shapes, out_dtype=out_dtype),
            out_type=jax.ShapeDtypeStruct((shapes.splits, shapes.out_rows, shapes.n), out_dtype),
            scratch_types=scratch, grid=(shapes.n // shapes.tile_n, shapes.splits), grid_names=("cols", "splits"),
            num_threads=shapes.warpgroups, thread_name="wg", compiler_params=_COMPILER_PARAMS,
        )(layer, x, x_scale, w, w_scale)


def _kernel(layer_ref, x_ref, x_scale_ref, w_ref, w_scale_ref, out_ref, x_scale_smem, w_scale_smem, scale_barrier, *,
            shapes: _Shapes, out_dtype):
    """Warpgroup 0 issues every copy; each warpgroup multiplies its own rows of x by the whole weight tile. With
    two, a stage is refilled once both have finished with it (`consumed`)."""
    col, part, wg = lax.axis_index("cols"), lax.axis_index("splits"), lax.axis_index("wg")
    first_step = part * shapes.steps
    cols = pl.ds(col * shapes.tile_n, shapes.tile_n)
    layer = layer_ref[0]
    two = shapes.warpgroups > 1

    def pipeline(w_smem, x_smem, loaded, consumed):
        def fetch(step):
            stage = lax.rem(step, shapes.num_stages)
            ks = pl.ds((first_step + step) * _TILE_K, _TILE_K)
            plgpu.copy_gmem_to_smem(w_ref.at[layer, cols, ks], w_smem.at[stage], loaded.at[stage])
            plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[stage, pl.ds(0, shapes.in_rows)], loaded.at[stage])

        @pl.when(wg == 0)
        def _prologue():
            for step in range(min(shapes.num_stages, shapes.steps)):
                fetch(step)
            plgpu.copy_gmem_to_smem(x_scale_ref, x_scale_smem.at[pl.ds(0, shapes.in_rows)], scale_barrier)
            plgpu.copy_gmem_to_smem(w_scale_ref.at[layer, cols], w_scale_smem, scale_barrier)

        def refill(j, stage):
            if two:
                plgpu.barrier_wait(consumed.at[stage])
            fetch(j + shapes.num_stages)

        def accumulate(acc_ref):
            def step(j, carry):
                stage = lax.rem(j, shapes.num_stages)
                plgpu.barrier_wait(loaded.at[stage])
                plgpu.wgmma(acc_ref, x_smem.at[stage, pl.ds(wg * shapes.wg_rows, shapes.wg_rows)],
                            w_smem.at[stage].transpose((1, 0)))
                # Waiting here, not one step later: leaving one or two wgmmas running was 10% and 77% slower at 256
                # rows on an H100 (gate/up 98.0 and 157.0 against 88.8 us; `benchmarks/fp8_gemm.py`).
                plgpu.wgmma_wait(0)
                refilled = j + shapes.num_stages < shapes.steps
                if two:  # only stages that will be refilled are released, so warpgroup 0 sees every release
                    pl.when(refilled)(lambda: plgpu.barrier_arrive(consumed.at[stage]))
                pl.when((wg == 0) & refilled)(lambda: refill(j, stage))
                return carry

            lax.fori_loop(0, shapes.steps, step, 0)
            return acc_ref[...]

        return pl.run_scoped(accumulate, plgpu.ACC((shapes.wg_rows, shapes.tile_n), jnp.float32))

    acc = pl.run_scoped(
        pipeline,
        plgpu.SMEM((shapes.num_stages, shapes.tile_n, _TILE_K), FP8, transforms=_transforms(FP8, _TILE_K)),
        plgpu.SMEM((shapes.num_stages, shapes.rows, _TILE_K), FP8, transforms=_transforms(FP8, _TILE_K)),
        plgpu.Barrier(num_arrivals=2, num_barriers=shapes.num_stages),
        plgpu.Barrier(num_arrivals=shapes.warpgroups, num_barriers=shapes.num_stages),
        collective_axes="wg")
    plgpu.barrier_wait(scale_barrier)
    wgmma = plgpu.Layout.WGMMA
    own = pl.ds(wg * shapes.wg_rows, shapes.wg_rows)
    row_scale = plgpu.load(x_scale_smem.at[own], layout=wgmma.reduce(1), optimized=False)
    col_scale = plgpu.load(w_scale_smem, layout=wgmma.reduce(0), optimized=False)
    acc = acc * lax.broadcast_in_dim(row_scale, acc.shape, [0]) * lax.broadcast_in_dim(col_scale, acc.shape, [1])

    def epilogue(out_smem):
        out_smem.at[own][...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        for w in range(shapes.warpgroups):  # each warpgroup writes its own rows of x's, if it has any
            first = w * shapes.wg_rows
            count = min(shapes.wg_rows, shapes.out_rows - first)
            if count > 0:
                pl.when(wg == w)(lambda: plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(first, count)],
                                                                 out_ref.at[part, pl.ds(first, count), cols]))
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(epilogue, plgpu.SMEM((shapes.rows, shapes.tile_n), out_dtype,
                                       transforms=_transforms(out_dtype, shapes.tile_n)), collective_axes="wg")
