"""A probe: can a Pallas Triton kernel for few rows stream a stacked layer's bfloat16 weight faster than cuBLAS?

`x [M, K] @ w[layer]` with `w [layers, K, N]` read in place (the layer an operand, as the attention kernel takes
its cache layer). Each program owns `block_n` columns and `K / splits` of the rows and loops over `block_k`-row
tiles; float32 partials are summed by XLA when `splits > 1`. Two kernels: `mma` multiplies the tiles on the tensor
cores (x's rows padded to 16); `fma` multiplies and adds on the CUDA cores, elementwise per row of x, and sums over
K once at the end (for one or a few rows). Each case reads its stacked layers in a `fori_loop`, as
`bf16_gemm_layouts.py` times cuBLAS, next to cuBLAS and to `stream`, XLA's plain reduction of the same weights (not
a product: the rate a streaming kernel reaches).

    python benchmarks/triton_gemv.py [--rows 1 16] [--cases qkv o gate_up down] [--kernels mma fma] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random

import jax
import jax.numpy as jnp
from attention import gpu_time, save_rows
from bf16_gemm_layouts import SHAPES, matmul, relative_error, weight
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

import jaxllm  # noqa: F401  (its XLA flags: cuBLAS GEMMs, no dot merger)

ROWS = 16  # tl.dot's smallest M


def gemv(x: jax.Array, w: jax.Array, layer: jax.Array, *, block_n: int, block_k: int, splits: int, num_warps: int,
         num_stages: int, interpret: bool = False) -> jax.Array:
    """`x @ w[layer]` in float32 (`x [M <= 16, K]`, `w [L, K, N]` bfloat16)."""
    m, k = x.shape
    n = w.shape[2]
    if m > ROWS or n % block_n or k % (splits * block_k):
        raise ValueError(f"rows {m} > {ROWS}, or N {n} / K {k} not tiled by {block_n} / {splits} x {block_k}")
    xp = jnp.pad(x, ((0, ROWS - m), (0, 0)))
    steps = k // splits // block_k

    def kernel(layer_ref, x_ref, w_ref, o_ref):
        col, split = pl.program_id(0), pl.program_id(1)
        index = layer_ref[0]

        def body(i, acc):
            k0 = pl.multiple_of((split * steps + i) * block_k, block_k)
            xb = x_ref[:, pl.ds(k0, block_k)]
            wb = w_ref[index, pl.ds(k0, block_k), pl.ds(col * block_n, block_n)]
            return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, steps, body, jnp.zeros((ROWS, block_n), jnp.float32))
        o_ref[split, :, pl.ds(col * block_n, block_n)] = acc

    return _launch(kernel, layer, xp, w, block_n, splits, num_warps, num_stages, interpret)[:m]


def fma_gemv(x: jax.Array, w: jax.Array, layer: jax.Array, *, block_n: int, block_k: int, splits: int,
             num_warps: int, num_stages: int, interpret: bool = False) -> jax.Array:
    """`x @ w[layer]` in float32 on the CUDA cores, for a few rows (`x [M, K]`, M static and small): each program
    accumulates `x[:, k, None] * w[k, n]` over its K range elementwise, per row, and sums over K once at the end."""
    m, k = x.shape
    n = w.shape[2]
    if n % block_n or k % (splits * block_k):
        raise ValueError(f"N {n} / K {k} not tiled by {block_n} / {splits} x {block_k}")
    steps = k // splits // block_k

    def kernel(layer_ref, x_ref, w_ref, o_ref):
        col, split = pl.program_id(0), pl.program_id(1)
        index = layer_ref[0]

        def body(i, accs):
            k0 = pl.multiple_of((split * steps + i) * block_k, block_k)
            wb = w_ref[index, pl.ds(k0, block_k), pl.ds(col * block_n, block_n)].astype(jnp.float32)
            return tuple(acc + x_ref[r, pl.ds(k0, block_k)].astype(jnp.float32)[:, None] * wb
                         for r, acc in enumerate(accs))

        zero = jnp.zeros((block_k, block_n), jnp.float32)
        accs = lax.fori_loop(0, steps, body, (zero,) * m)
        for r, acc in enumerate(accs):
            o_ref[split, r, pl.ds(col * block_n, block_n)] = acc.sum(0)

    return _launch(kernel, layer, x, w, block_n, splits, num_warps, num_stages, interpret)


def _launch(kernel, layer, x, w, block_n: int, splits: int, num_warps: int, num_stages: int,
            interpret: bool) -> jax.Array:
    """Run a kernel writing float32 `[splits, rows of x, N]` partials over the (column block, split) grid; their
    sum over the splits."""
    rows, n = x.shape[0], w.shape[2]
    out = pl.pallas_call(
        kernel, grid=(n // block_n, splits), out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret)(jnp.reshape(layer, (1,)).astype(jnp.int32), x, w)
    return out.sum(0) if splits > 1 else out[0]


def stream(x: jax.Array, w: jax.Array, layer) -> jax.Array:
    """Not a product: XLA's reduction of the layer's weights, the read rate a plain streaming kernel reaches."""
    return jnp.broadcast_to(lax.dynamic_index_in_dim(w, layer, keepdims=False).astype(jnp.float32).sum(0)[:8],
                            (x.shape[0], 8))


def loop(fn):
    def run(x, w):
        def body(i, acc):
            return acc + fn(x, w, i)[:, :8].astype(jnp.float32)
        return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], 8), jnp.float32))
    return jax.jit(run)


def configs(n: int, k: int, fma: bool = False) -> list[dict]:
    """Tilings with at least one program per SM, in a fixed shuffled order (so `--limit` samples the space)."""
    block_ns, block_ks = ((64, 128, 256, 512), (8, 16, 32)) if fma else ((32, 64, 128), (64, 128, 256))
    out = [dict(block_n=bn, block_k=bk, splits=s, num_warps=w, num_stages=st)
           for bn, bk, s, w, st in itertools.product(block_ns, block_ks, (1, 2, 4), (4, 8), (2, 3, 4))
           if n % bn == 0 and k % (s * bk) == 0 and 120 <= n // bn * s <= 4096]
    random.Random(0).shuffle(out)
    return out


def timed_row(name: str, m: int, kernel: str, fn, x, w, ref, cfg: dict) -> dict | None:
    """One timed case (microseconds a layer, weight bytes a second, error at the last layer), or None where Triton
    refuses the tiling."""
    layers = w.shape[0]
    try:
        t = gpu_time(loop(fn), x, w) / layers
        err = 0.0 if ref is None else relative_error(jax.jit(fn)(x, w, jnp.int32(layers - 1)), ref)
    except Exception as e:  # noqa: BLE001  (a tiling Triton refuses is reported, not fatal)
        print(f"  {kernel} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None
    return dict(case=name, rows=m, kernel=kernel, **cfg, us=t * 1e6, tbs=w[0].nbytes / t / 1e12, err=err)


def case_rows(name: str, rows: list[int], kernels: list[str], limit: int) -> list[dict]:
    k, n, layers = SHAPES[name]
    w = weight(jax.random.key(1), layers, k, n, "kn")
    last = w[-1].astype(jnp.float32)
    out = []
    for m in rows:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        ref = x.astype(jnp.float32) @ last
        for kernel, fn in (("stream", stream), ("cublas", lambda x, w, i: matmul(x, w, i, "kn"))):
            r = timed_row(name, m, kernel, fn, x, w, None if kernel == "stream" else ref, {})
            out.append(r)
            print(f"{name} rows={m} {kernel}: {r['us']:.1f} us ({r['tbs']:.2f} TB/s)", flush=True)
        for kernel in kernels:
            impl = {"mma": gemv, "fma": fma_gemv}[kernel]
            timed = [r for cfg in configs(n, k, kernel == "fma")[:limit]
                     if (r := timed_row(name, m, kernel, functools.partial(impl, **cfg), x, w, ref, cfg))]
            timed.sort(key=lambda r: r["us"])
            for r in timed[:3]:
                print(f"  {kernel} {r['us']:.1f} us ({r['tbs']:.2f} TB/s) err {r['err']:.1e} bn={r['block_n']} "
                      f"bk={r['block_k']} s={r['splits']} w={r['num_warps']} st={r['num_stages']}", flush=True)
            out += timed
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[16])
    parser.add_argument("--cases", nargs="+", default=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--kernels", nargs="+", default=["mma", "fma"], choices=["mma", "fma"])
    parser.add_argument("--limit", type=int, default=200, help="configs tried per case and row count")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for case in args.cases:
        results += case_rows(case, args.rows, args.kernels, args.limit)
    save_rows(args.json, results)


if __name__ == "__main__":
    main()
