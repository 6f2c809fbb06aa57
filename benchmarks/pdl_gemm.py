"""A probe: does programmatic dependent launch (PDL) let a few-row GEMM start streaming its weights while the
kernel before it is still running, inside XLA's layer loop?

A batch-1 layer's GEMMs each follow a small XLA fusion (a norm, SiLU, RoPE), and each GEMM kernel spends its first
microseconds filling its weight pipeline. A Mosaic GPU kernel that calls `griddepcontrol.wait` is launched with
programmatic stream serialization: it may start before the kernel ahead of it ends, and only its reads of that
kernel's output must come after the wait. Here session 9's few-row GEMM (`4ac3f5f`, swap AB: `out^T [tile_n, T]
+= w^T x^T`, weight tiles streamed by TMA, K split over blocks, float32 partials summed by XLA) issues its first
`num_stages` weight tiles, then waits, then loads x. Each case runs its stacked layers in a `fori_loop` with a
norm-like fusion before every GEMM and a reduction after it, as the model's loop does, and prints microseconds a
layer for cuBLAS, the kernel without PDL, and the kernel with it.

    python benchmarks/pdl_gemm.py [--cases qkv o gate_up down] [--stages 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
from attention import gpu_time, save_rows
from bf16_gemm_layouts import SHAPES, matmul, relative_error, weight
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

import jaxllm  # noqa: F401  (its XLA flags: cuBLAS GEMMs, no dot merger)
from jaxllm.models.layers import rms_norm
from pallas_kernels.gpu import _interpret_off_gpu

ROWS, NUM_SMS = 16, 132
_PARAMS = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True)
class Plan:
    k: int
    n: int
    tile_n: int
    tile_k: int
    num_stages: int
    splits: int
    pdl: bool

    @property
    def steps(self) -> int:
        return self.k // self.splits // self.tile_k


def plan(k: int, n: int, num_stages: int, pdl: bool, tile_n: int = 64, tile_k: int = 64) -> Plan:
    """The fewest K splits that give every SM two blocks, as session 9's kernel chose them."""
    steps = k // tile_k
    splits = next((s for s in range(1, steps + 1) if steps % s == 0 and n // tile_n * s >= 2 * NUM_SMS), steps)
    return Plan(k, n, tile_n, tile_k, max(1, min(num_stages, steps // splits)), splits, pdl)


def _transforms(dtype, minor: int) -> tuple:
    swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(layer_ref, x_ref, w_ref, out_ref, w_smem, x_smem, out_smem, barriers, *, p: Plan):
    col, part = lax.axis_index("cols"), lax.axis_index("splits")
    first_step = part * p.steps
    cols = pl.ds(col * p.tile_n, p.tile_n)
    layer = layer_ref[0]

    def ks(step):
        return pl.ds((first_step + step) * p.tile_k, p.tile_k)

    def fetch_w(step):
        stage = lax.rem(step, p.num_stages)
        plgpu.copy_gmem_to_smem(w_ref.at[layer, ks(step), cols], w_smem.at[stage], barriers.at[stage])

    def fetch_x(step):
        stage = lax.rem(step, p.num_stages)
        plgpu.copy_gmem_to_smem(x_ref.at[:, ks(step)], x_smem.at[stage], barriers.at[stage])

    ahead = min(p.num_stages, p.steps)
    for step in range(ahead):
        fetch_w(step)
    if p.pdl:  # the weights do not depend on the kernel ahead; x does
        plgpu.griddepcontrol_wait()
    for step in range(ahead):
        fetch_x(step)

    def accumulate(acc_ref):
        def step(j, carry):
            stage = lax.rem(j, p.num_stages)
            plgpu.barrier_wait(barriers.at[stage])
            plgpu.wgmma(acc_ref, w_smem.at[stage].transpose((1, 0)), x_smem.at[stage].transpose((1, 0)))
            plgpu.wgmma_wait(0)

            @pl.when(j + p.num_stages < p.steps)
            def _():
                fetch_w(j + p.num_stages)
                fetch_x(j + p.num_stages)
            return carry

        lax.fori_loop(0, p.steps, step, 0)
        return acc_ref[...]

    out_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((p.tile_n, ROWS), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[part, cols])
    plgpu.wait_smem_to_gmem(0)


def skinny(x: jax.Array, w: jax.Array, layer, p: Plan) -> jax.Array:
    """`x [16, K] @ w[layer]`, float32 `[16, N]`, the splits summed by XLA."""
    dt, s = x.dtype, p.num_stages
    scratch = [plgpu.SMEM((s, p.tile_k, p.tile_n), dt, transforms=_transforms(dt, p.tile_n)),
               plgpu.SMEM((s, ROWS, p.tile_k), dt, transforms=_transforms(dt, p.tile_k)),
               plgpu.SMEM((p.tile_n, ROWS), jnp.float32, transforms=_transforms(jnp.float32, ROWS)),
               plgpu.Barrier(num_arrivals=2, num_barriers=s)]
    with _interpret_off_gpu():
        partials = plgpu.kernel(
            functools.partial(_kernel, p=p), out_type=jax.ShapeDtypeStruct((p.splits, p.n, ROWS), jnp.float32),
            scratch_types=scratch, grid=(p.n // p.tile_n, p.splits), grid_names=("cols", "splits"),
            compiler_params=_PARAMS)(jnp.asarray(layer, jnp.int32).reshape(1), x, w)
    return partials.sum(0).T


def chain(gemm):
    """The stacked layers in a loop: a norm-like fusion, the GEMM, a reduction of its output into the carry."""
    def run(x, w):
        def body(i, h):
            out = gemm(rms_norm(h, None, 1e-5), w, i).astype(jnp.float32)
            return (h.astype(jnp.float32) * 0.5 + jnp.mean(out, axis=1, keepdims=True)).astype(h.dtype)
        return lax.fori_loop(0, w.shape[0], body, x)
    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        k, n, layers = SHAPES[case]
        w = weight(jax.random.key(1), layers, k, n, "kn")
        x = jax.random.normal(jax.random.key(2), (ROWS, k), jnp.bfloat16)
        ref = x.astype(jnp.float32) @ w[-1].astype(jnp.float32)
        variants = {"cublas": lambda h, w, i: matmul(h, w, i, "kn")}
        for stages in args.stages:
            for pdl in (False, True):
                p = plan(k, n, stages, pdl)
                variants[f"kernel s{p.num_stages}{' pdl' if pdl else ''}"] = functools.partial(skinny, p=p)
        for name, fn in variants.items():
            t = gpu_time(chain(fn), x, w) / layers
            err = relative_error(jax.jit(fn)(x, w, layers - 1), ref)
            rows.append(dict(case=case, variant=name, us=t * 1e6, tbs=w[0].nbytes / t / 1e12, err=err))
            print(f"{case} {name}: {t * 1e6:.1f} us a layer ({w[0].nbytes / t / 1e12:.2f} TB/s) err {err:.1e}",
                  flush=True)
    save_rows(args.json, rows)


if __name__ == "__main__":
    main()
