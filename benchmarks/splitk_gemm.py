"""Few-row bfloat16 GEMMs of a Llama-3.1-8B layer with K split into `s` batches for cuBLAS, against one GEMM.

At batch-1 decode (16 padded rows) cuBLAS runs the o and down projections (N = 4096) as 64 column tiles, each a
cluster of two blocks, so about half the H100's 132 SMs stream the weights; an L2-resident o weight still took 11.9
us against 14.3 from HBM (session 13). Splitting K into `s` batches of one batched GEMM (`x [M, s, K/s]` against the
layer's weight seen as `[s, K/s, N]`, a bitcast) gives cuBLAS `s` times the blocks; XLA then sums the float32
partials. Each case reads its stacked layers in a `fori_loop`, sliced by the loop counter as the model's layer loop
reads them, and adds each layer's product into a float32 accumulator (so the sum of the partials is timed too);
checked against a float32 product.

    python benchmarks/splitk_gemm.py [--rows 16 64] [--splits 1 2 4] [--cases qkv o gate_up down]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from attention import gpu_time, print_grid, save_rows
from bf16_gemm_layouts import relative_error
from fp8_gemm import gemm_calls
from jax import lax

import jaxllm  # noqa: F401  (its XLA flags: cuBLAS GEMMs, no dot merger)

E, QKV, MLP = 4096, 6144, 14336
SHAPES = {"qkv": (E, QKV, 8), "o": (E, E, 8), "gate_up": (E, 2 * MLP, 4), "down": (MLP, E, 4)}


def split_matmul(x: jax.Array, w: jax.Array, i, splits: int) -> jax.Array:
    """`x [M, K] @ w[i]` as `splits` batched GEMMs over K ranges, summed in float32 (one plain GEMM at 1)."""
    wi = lax.dynamic_index_in_dim(w, i, keepdims=False)
    if splits == 1:
        return jnp.dot(x, wi)
    m, k = x.shape
    parts = lax.dot_general(x.reshape(m, splits, k // splits), wi.reshape(splits, k // splits, wi.shape[1]),
                            (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)
    return parts.sum(axis=0).astype(x.dtype)


def loop(splits: int):
    def run(x, w):
        def body(i, acc):
            return acc + split_matmul(x, w, i, splits).astype(jnp.float32)
        return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], w.shape[2]), jnp.float32))
    return jax.jit(run)


def case_rows(name: str, rows: list[int], splits: list[int]) -> list[dict]:
    k, n, layers = SHAPES[name]
    w = jax.random.normal(jax.random.key(1), (layers, k, n), jnp.bfloat16) * 0.02
    last = w[-1].astype(jnp.float32)
    out = []
    for m in rows:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        ref = x.astype(jnp.float32) @ last
        for s in splits:
            fn = loop(s)
            t = gpu_time(fn, x, w) / layers
            err = relative_error(jax.jit(split_matmul, static_argnums=3)(x, w, layers - 1, s), ref)
            out.append(dict(case=name, rows=m, splits=s, us=t * 1e6, tbs=w[0].nbytes / t / 1e12, err=err,
                            calls=gemm_calls(fn, x, w)))
            print(f"{name} rows={m} splits={s}: {t * 1e6:.1f} us ({w[0].nbytes / t / 1e12:.2f} TB/s) err {err:.1e} "
                  f"calls {out[-1]['calls']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cases", nargs="+", default=list(SHAPES))
    parser.add_argument("--json")
    args = parser.parse_args()
    uneven = [(c, s) for c in args.cases for s in args.splits if SHAPES[c][0] % s]
    if uneven:
        named = ", ".join(f"{c} (K={SHAPES[c][0]}) by {s}" for c, s in uneven)
        parser.error(f"--splits must divide each case's K: {named}")
    results = [r for case in args.cases for r in case_rows(case, args.rows, args.splits)]
    print_grid(results, ("case", "rows"), args.cases, args.rows, [f"{s} split(s) us (TB/s)" for s in args.splits])
    save_rows(args.json, results)


if __name__ == "__main__":
    main()
