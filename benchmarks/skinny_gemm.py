"""The decode GEMMs of a Llama-3.1-8B layer at few rows: `pallas_kernels.skinny_gemm` against XLA (cuBLAS).

Each case reads `--layers` stacked layers of one projection in a `fori_loop`, as the model's layer loop does
(so no layer's weights are still in L2 when it is read again), and reports the time per layer and the weight
bytes per second. Every kernel variant is checked against a float32 product first.

    python benchmarks/skinny_gemm.py [--rows 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
from attention import gpu_time, save_rows
from jax import lax

from pallas_kernels.skinny_gemm import GemmSizes, _plan, skinny_matmul

# name: (K, N, stacked layers)
SHAPES = {"q": (4096, 4096, 8), "kv": (4096, 2048, 8), "o": (4096, 4096, 8), "gate_up": (4096, 28672, 4),
          "down": (14336, 4096, 4), "lm_head": (4096, 128256, 1)}


def layer_loop(matmul):
    """A function running `matmul(x, w, i)` for every layer i of w, as the model's layer loop does."""
    def run(x, w):
        def body(i, acc):
            return acc + matmul(x, w, i)[:, :8].astype(jnp.float32)
        return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], 8), jnp.float32))
    return jax.jit(run)


def xla_matmul(x, w, i):
    return jnp.dot(x, lax.dynamic_index_in_dim(w, i, keepdims=False))


def variants(k: int, n: int, rows: int, args):
    """The tile, stage and split choices of the command line that fit one shape (splits: multiples of the
    fewest that give every SM two blocks)."""
    seen = set()
    for tile_n, tile_k, stages, split_scale in itertools.product(args.tile_n, args.tile_k, args.stages,
                                                                 args.split_scale):
        base = _plan(rows, k, n, GemmSizes(tile_n, tile_k, stages), jnp.bfloat16)
        splits = base.splits * split_scale
        if (k // base.tile_k) % splits:
            continue
        shapes = _plan(rows, k, n, GemmSizes(tile_n, tile_k, stages, splits), jnp.bfloat16)
        if shapes in seen:
            continue
        seen.add(shapes)
        yield GemmSizes(tile_n, tile_k, stages, splits), shapes


def read_ceiling() -> dict:
    """What XLA's reduction reads of 1 GiB of bfloat16 a second: the bandwidth a weight stream can hope for."""
    w = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.bfloat16)
    t = gpu_time(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), w)
    print(f"read ceiling (XLA sum of 1 GiB bfloat16): {w.nbytes / t / 1e12:.2f} TB/s")
    return dict(shape="read_1GiB", variant="xla_sum", us=t * 1e6, tbs=w.nbytes / t / 1e12)


def check(x, w, sizes: GemmSizes) -> float:
    """Largest error against the float32 product, relative to the largest output."""
    ref = jnp.dot(x.astype(jnp.float32), w[0].astype(jnp.float32))
    out = skinny_matmul(x, w, 0, sizes).astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tile-n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tile-k", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--stages", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--split-scale", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows_out = [read_ceiling()]
    for name in args.shapes:
        k, n, layers = SHAPES[name]
        w = jax.random.normal(jax.random.key(1), (layers, k, n), jnp.bfloat16)
        per_layer = k * n * 2
        for rows in args.rows:
            x = jax.random.normal(jax.random.key(2), (rows, k), jnp.bfloat16)
            xla = gpu_time(layer_loop(xla_matmul), x, w) / layers
            print(f"{name} rows={rows} K={k} N={n}: XLA {xla * 1e6:.1f} us ({per_layer / xla / 1e12:.2f} TB/s)")
            rows_out.append(dict(shape=name, rows=rows, variant="xla", us=xla * 1e6, tbs=per_layer / xla / 1e12))
            best = None
            for sizes, shapes in variants(k, n, rows, args):
                err = check(x, w, sizes)
                t = gpu_time(layer_loop(lambda a, b, i, s=sizes: skinny_matmul(a, b, i, s)), x, w) / layers
                label = f"n{shapes.tile_n} k{shapes.tile_k} st{shapes.num_stages} sp{shapes.splits}"
                rows_out.append(dict(shape=name, rows=rows, variant=label, us=t * 1e6, tbs=per_layer / t / 1e12,
                                     err=err))
                if best is None or t < best[0]:
                    best = (t, label, err)
                print(f"  {label}: {t * 1e6:.1f} us ({per_layer / t / 1e12:.2f} TB/s) err {err:.1e}")
            print(f"  best {best[1]}: {best[0] * 1e6:.1f} us ({per_layer / best[0] / 1e12:.2f} TB/s), "
                  f"x{xla / best[0]:.2f} against XLA")
    save_rows(args.json, rows_out)


if __name__ == "__main__":
    main()
