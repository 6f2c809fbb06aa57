"""A probe: a batch-1 MLP (gate/up, SiLU times up, down) as one Pallas Triton kernel, against cuBLAS's two GEMMs.

Each program owns `block_i` of the 14,336 intermediate columns: it computes their gate and up over all of K
(reading its columns of `gate_up [layers, E, 2I]` in place), SiLU-times-up in registers, then multiplies that
`[16, block_i]` slice by its rows of `down [layers, I, E]` and adds the `[16, E]` partial into a float32 output
with atomic adds. No program waits for another, and there is one kernel where cuBLAS needs two (and XLA a third,
for SiLU). Each case runs 4 stacked layers in a `fori_loop`, the residual carried, and prints microseconds a layer.

`--norm` times the design jaxllm kept instead, deterministic (no atomics): `pallas_kernels.norm_gate_up`, the
post-attention RMSNorm, gate/up and SiLU times up in one kernel writing the bfloat16 `[16, I]` input of cuBLAS's
down GEMM, against XLA's norm fusion, cuBLAS, XLA's SiLU fusion and cuBLAS. (Session 15 first timed a copy of
the kernel written here, on a `[layers, E, 2I]` weight; the figures in docs/performance.md say which.)

    python benchmarks/fused_mlp.py [--rows 1 16] [--limit 24] [--norm] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import random

import jax
import jax.numpy as jnp
from attention import gpu_time, save_rows
from bf16_gemm_layouts import relative_error
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

import jaxllm  # noqa: F401  (its XLA flags: cuBLAS GEMMs, no dot merger)
from jaxllm.models.layers import rms_norm
from pallas_kernels.norm_gate_up import Sizes, norm_gate_up

E, MLP, LAYERS, ROWS = 4096, 14336, 4, 16


def fused_mlp(x, gate_up, down, layer, real_rows, *, block_i: int, block_k: int, block_n: int, num_warps: int,
              num_stages: int, masked: bool, interpret: bool = False) -> jax.Array:
    """`silu(x @ gate) * (x @ up) @ down` at `layer`, float32 `[M, E]` (`x [M <= 16, E]` bfloat16)."""
    m, e = x.shape
    inter = down.shape[1]
    xp = jnp.pad(x, ((0, ROWS - m), (0, 0)))
    rows = jnp.reshape(jnp.asarray(real_rows, jnp.int32), (1,))

    def kernel(layer_ref, rows_ref, x_ref, gu_ref, d_ref, zeros_ref, o_ref):
        del zeros_ref
        block, index = pl.program_id(0), layer_ref[0]
        cols = pl.multiple_of(block * block_i, block_i)

        def k_step(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xb = x_ref[:, pl.ds(k0, block_k)]
            g = acc[0] + jnp.dot(xb, gu_ref[index, pl.ds(k0, block_k), pl.ds(cols, block_i)],
                                 preferred_element_type=jnp.float32)
            u = acc[1] + jnp.dot(xb, gu_ref[index, pl.ds(k0, block_k), pl.ds(inter + cols, block_i)],
                                 preferred_element_type=jnp.float32)
            return g, u

        zero = jnp.zeros((ROWS, block_i), jnp.float32)
        g, u = lax.fori_loop(0, e // block_k, k_step, (zero, zero))
        h = (g * jax.nn.sigmoid(g) * u).astype(x_ref.dtype)
        live = (lax.broadcasted_iota(jnp.int32, (ROWS, block_n), 0) < rows_ref[0]) if masked else None

        def n_step(j, carry):
            n0 = pl.multiple_of(j * block_n, block_n)
            part = jnp.dot(h, d_ref[index, pl.ds(cols, block_i), pl.ds(n0, block_n)],
                           preferred_element_type=jnp.float32)
            pltriton.atomic_add(o_ref, (slice(None), pl.ds(n0, block_n)), part, mask=live)
            return carry

        lax.fori_loop(0, e // block_n, n_step, 0)

    out = pl.pallas_call(
        kernel, grid=(inter // block_i,), out_shape=jax.ShapeDtypeStruct((ROWS, e), jnp.float32),
        input_output_aliases={5: 0},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages), interpret=interpret,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), rows, xp, gate_up, down, jnp.zeros((ROWS, e), jnp.float32))
    return out[:m]


def xla_norm_mlp(x, gate_up, down, i):
    """The model's post-attention half of a layer on cuBLAS (`gate_up [layers, E, 2, I]`, as the model stores it):
    XLA's norm, gate/up, XLA's SiLU times up, down."""
    weight = lax.dynamic_index_in_dim(gate_up, i, keepdims=False)
    gu = lax.dot_general(rms_norm(x, None, 1e-5), weight, (((1,), (0,)), ((), ())))
    return (jax.nn.silu(gu[:, 0]) * gu[:, 1]) @ lax.dynamic_index_in_dim(down, i, keepdims=False)


def norm_gate_up_mlp(x, gate_up, down, i, **cfg):
    """The same with jaxllm's kernel for the norm, gate/up and SiLU (`pallas_kernels.norm_gate_up`)."""
    h = norm_gate_up(x, gate_up, i, 1e-5, Sizes(**cfg))
    return h @ lax.dynamic_index_in_dim(down, i, keepdims=False)


def xla_mlp(x, gate_up, down, i):
    gu = x @ lax.dynamic_index_in_dim(gate_up, i, keepdims=False)
    return (jax.nn.silu(gu[:, :MLP]) * gu[:, MLP:]) @ lax.dynamic_index_in_dim(down, i, keepdims=False)


def chain(mlp):
    """The MLPs of the stacked layers in a loop, the residual carried (scaled so that it stays finite)."""
    def run(x, gate_up, down):
        def body(i, h):
            return ((h + mlp(h, gate_up, down, i).astype(h.dtype)) * 0.5).astype(h.dtype)
        return lax.fori_loop(0, gate_up.shape[0], body, x)
    return jax.jit(run)


def configs() -> list[dict]:
    out = [dict(block_i=bi, block_k=bk, block_n=bn, num_warps=w, num_stages=s, masked=m)
           for bi, bk, bn, w, s, m in itertools.product((32, 64, 128), (64, 128), (64, 128, 256), (4, 8), (2, 3, 4),
                                                        (True, False))]
    random.Random(0).shuffle(out)
    return out


def norm_configs() -> list[dict]:
    """The kernel's default tiling first, then the others in a fixed shuffled order."""
    default = dataclasses.asdict(Sizes())
    out = [dict(block_i=bi, block_k=bk, num_warps=w, num_stages=s)
           for bi, bk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4))]
    random.Random(0).shuffle(out)
    return [default] + [c for c in out if c != default]


def atomic_mlp(x, gate_up, down, i, **cfg):
    return fused_mlp(x, gate_up, down, i, x.shape[0], **cfg)


def sweep(kind: str, base, kernel, tilings: list[dict], rows: list[int], gate_up, down) -> list[dict]:
    """`base` (cuBLAS with XLA's fusions) and `kernel` at each tiling, in the stacked layers' loop: microseconds a
    layer, and each tiling's error against `base` at the last layer."""
    nbytes = gate_up[0].nbytes + down[0].nbytes
    results = []
    for m in rows:
        x = jax.random.normal(jax.random.key(m), (m, E), jnp.bfloat16)
        ref = jax.jit(base)(x, gate_up, down, LAYERS - 1).astype(jnp.float32)
        t = gpu_time(chain(base), x, gate_up, down) / LAYERS
        results.append(dict(rows=m, kernel="cublas", us=t * 1e6, tbs=nbytes / t / 1e12))
        print(f"rows={m} cuBLAS and XLA's fusions: {t * 1e6:.1f} us a layer ({nbytes / t / 1e12:.2f} TB/s)", flush=True)
        timed = []
        for cfg in tilings:
            mlp = functools.partial(kernel, **cfg)
            try:
                t = gpu_time(chain(mlp), x, gate_up, down) / LAYERS
                err = relative_error(jax.jit(mlp)(x, gate_up, down, LAYERS - 1), ref)
            except Exception as e:  # noqa: BLE001  (a tiling Triton refuses is reported, not fatal)
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            timed.append(dict(rows=m, kernel=kind, **cfg, us=t * 1e6, tbs=nbytes / t / 1e12, err=err))
        timed.sort(key=lambda r: r["us"])
        for r in timed[:4]:
            print(f"  {kind} {r['us']:.1f} us ({r['tbs']:.2f} TB/s) err {r['err']:.1e} "
                  + " ".join(f"{key}={r[key]}" for key in tilings[0]), flush=True)
        results += timed
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--norm", action="store_true", help="time the norm + gate/up + SiLU kernel instead")
    parser.add_argument("--json")
    args = parser.parse_args()
    k1, k2 = jax.random.split(jax.random.key(0))
    gate_up = jax.random.normal(k1, (LAYERS, E, 2 * MLP), jnp.bfloat16) * 0.02
    down = jax.random.normal(k2, (LAYERS, MLP, E), jnp.bfloat16) * 0.02
    if args.norm:
        rows = sweep("norm_gate_up", xla_norm_mlp, norm_gate_up_mlp, norm_configs()[:args.limit], args.rows,
                     gate_up.reshape(LAYERS, E, 2, MLP), down)
    else:
        rows = sweep("fused", xla_mlp, atomic_mlp, configs()[:args.limit], args.rows, gate_up, down)
    save_rows(args.json, rows)


if __name__ == "__main__":
    main()
