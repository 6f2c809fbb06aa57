"""Batch-1 and batch-256 bfloat16 GEMMs of a Llama-3.1-8B layer in two weight layouts, through XLA's cuBLAS calls.

`kn`: the weight stored `[layers, K, N]`, as jaxllm stores it (`x @ w`); `nk`: `[layers, N, K]`, the contracting
dimension minor, as PyTorch's `nn.Linear` (and so vLLM) stores it. Each projection case reads its stacked layers in
a `fori_loop`, as the model's layer loop does, and reports the time per layer and the weight bytes per second;
`qkv` is q and the fused k/v as one weight. The `layer` case chains a decoder layer's five GEMMs (q, kv, o, gate/up,
down: the data flow of `DecoderLayer`, with SiLU-times-up and the residual adds but no attention or norms) over
all 32 layers, as separate q and kv weights (`split`) or one qkv weight (`fused`). Each case is checked at its last
layer against a float32 product.

    python benchmarks/bf16_gemm_layouts.py [--rows 1 16 256] [--cases q kv qkv o gate_up down layer] [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from attention import gpu_time, print_grid, save_rows
from fp8_gemm import gemm_calls
from jax import lax

import jaxllm  # noqa: F401  (its XLA flags: cuBLAS GEMMs, no dot merger)

E, Q, KV, MLP, LAYERS = 4096, 4096, 2048, 14336, 32
# name: (K, N, stacked layers); each stack is at least 256 MB, larger than the H100's 50 MB L2
SHAPES = {"q": (E, Q, 8), "kv": (E, KV, 16), "qkv": (E, Q + KV, 8), "o": (Q, E, 8),
          "gate_up": (E, 2 * MLP, 4), "down": (MLP, E, 4)}


def weight(key: jax.Array, layers: int, k: int, n: int, layout: str) -> jax.Array:
    shape = (layers, k, n) if layout == "kn" else (layers, n, k)
    return jax.random.normal(key, shape, jnp.bfloat16) * 0.02


def matmul(x: jax.Array, w: jax.Array, i, layout: str) -> jax.Array:
    """`x [M, K]` times layer `i` of `w` in `layout`, read where it lies (a dynamic slice XLA hands cuBLAS)."""
    wi = lax.dynamic_index_in_dim(w, i, keepdims=False)
    return lax.dot_general(x, wi, (((1,), (0 if layout == "kn" else 1,)), ((), ())))


def projection_loop(layout: str):
    def run(x, w):
        def body(i, acc):
            return acc + matmul(x, w, i, layout)[:, :8].astype(jnp.float32)
        return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], 8), jnp.float32))
    return jax.jit(run)


def layer_weights(layout: str, fused: bool) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 5)
    shapes = {"o": (Q, E), "gate_up": (E, 2 * MLP), "down": (MLP, E)}
    shapes.update({"qkv": (E, Q + KV)} if fused else {"q": (E, Q), "kv": (E, KV)})
    return {name: weight(key, LAYERS, k, n, layout) for key, (name, (k, n)) in zip(keys, shapes.items())}


def decoder_gemms(x: jax.Array, ws: dict[str, jax.Array], i, layout: str) -> jax.Array:
    """One layer's GEMMs in `DecoderLayer`'s data flow; the attention output is stood in for by q."""
    if "qkv" in ws:
        qkv = matmul(x, ws["qkv"], i, layout)
        q, kv = qkv[:, :Q], qkv[:, Q:]
    else:
        q, kv = matmul(x, ws["q"], i, layout), matmul(x, ws["kv"], i, layout)
    h = x + matmul(q + jnp.tile(kv, (1, Q // KV)), ws["o"], i, layout)
    gate_up = matmul(h, ws["gate_up"], i, layout)
    return h + matmul(jax.nn.silu(gate_up[:, :MLP]) * gate_up[:, MLP:], ws["down"], i, layout)


def layer_loop(layout: str):
    def run(x, ws):
        return lax.fori_loop(0, LAYERS, lambda i, h: decoder_gemms(h, ws, i, layout) * 0.01, x)
    return jax.jit(run)


def relative_error(out: jax.Array, expected: jax.Array) -> float:
    return float(jnp.linalg.norm(out.astype(jnp.float32) - expected) / jnp.linalg.norm(expected))


def projection_rows(name: str, rows: list[int]) -> list[dict]:
    k, n, layers = SHAPES[name]
    out = []
    for layout in ("kn", "nk"):
        w = weight(jax.random.key(hash(name) % 1000), layers, k, n, layout)
        last = w[-1].astype(jnp.float32)
        for m in rows:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            fn = projection_loop(layout)
            t = gpu_time(fn, x, w) / layers
            ref = x.astype(jnp.float32) @ (last if layout == "kn" else last.T)
            err = relative_error(jax.jit(matmul, static_argnums=3)(x, w, layers - 1, layout), ref)
            out.append(dict(case=name, layout=layout, rows=m, us=t * 1e6, tbs=w[0].nbytes / t / 1e12, err=err,
                            calls=gemm_calls(fn, x, w)))
        del w
    return out


def layer_rows(rows: list[int]) -> list[dict]:
    out = []
    for layout in ("kn", "nk"):
        for fused in (False, True):
            ws = layer_weights(layout, fused)
            nbytes = sum(w[0].nbytes for w in ws.values())
            for m in rows:
                x = jax.random.normal(jax.random.key(m), (m, E), jnp.bfloat16)
                t = gpu_time(layer_loop(layout), x, ws) / LAYERS
                out.append(dict(case="layer_fused" if fused else "layer_split", layout=layout, rows=m, us=t * 1e6,
                                tbs=nbytes / t / 1e12))
            del ws
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--cases", nargs="+", default=[*SHAPES, "layer"])
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for case in args.cases:
        new = layer_rows(args.rows) if case == "layer" else projection_rows(case, args.rows)
        for r in new:
            print(f"{r['case']} {r['layout']} rows={r['rows']}: {r['us']:.1f} us ({r['tbs']:.2f} TB/s)"
                  + (f" err {r['err']:.1e} calls {r['calls']}" if "err" in r else ""), flush=True)
        results += new
    print_grid(results, ("case", "rows"), dict.fromkeys(r["case"] for r in results), args.rows,
               ["kn us (TB/s)", "nk us (TB/s)"])
    save_rows(args.json, results)


if __name__ == "__main__":
    main()
