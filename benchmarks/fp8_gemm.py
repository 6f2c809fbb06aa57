"""The decode GEMMs of a Llama-3.1-8B layer with 8-bit (float8_e4m3fn) weights against bfloat16.

Each case reads 4-8 stacked layers of one projection in a `fori_loop`, as the model's layer loop does, and
reports the time per layer and the weight bytes per second. The fp8 variants keep the weight `[layers, N, K]`
(the contracting dimension minor, as cuBLASLt's FP8 GEMMs want) with one float32 scale an output channel, as the
model quantizes, and quantize the activations on the fly: one scale per row (`fp8_row`) or per tensor
(`fp8_tensor`) through XLA, which slices the layer, or one scale per row through `pallas_kernels.fp8_gemm`, which
reads the layer in place and applies both scales itself (`kernel`).
`w8a16` converts the weight to bfloat16 before a bfloat16 GEMM. jaxllm's XLA flags apply (cuBLAS GEMMs). Each
variant is checked at the last layer against a float32 product of its dequantized inputs, and the script prints
which GEMMs XLA called.

    python benchmarks/fp8_gemm.py [--rows 16 64 256] [--variants ...] [--sizes splits=1 tile_n=64,splits=2 ...]
        [--json out.json]

(`--sizes splits=N` is what session 10 ran as `--splits N`, at `8d73a69`.)
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
from attention import gpu_time, print_grid, save_rows
from jax import lax

from jaxllm.models.quantization import FP8 as F8  # importing jaxllm sets its XLA flags before JAX's backend starts
from jaxllm.models.quantization import FP8_MAX as F8_MAX
from jaxllm.models.quantization import quantize
from pallas_kernels.fp8_gemm import GemmSizes, fp8_matmul

# name: (K, N, stacked layers)
SHAPES = {"qkv": (4096, 6144, 8), "o": (4096, 4096, 8), "gate_up": (4096, 28672, 4), "down": (14336, 4096, 4)}


def quantize_rows(x: jax.Array, per_row: bool) -> tuple[jax.Array, jax.Array]:
    """`x` as float8 and its float32 scale (one per row, or one for the tensor), as the model quantizes inputs."""
    return quantize(x, (x.ndim - 1,) if per_row else tuple(range(x.ndim)))


def bf16_matmul(x, w, s, i):
    return jnp.dot(x, lax.dynamic_index_in_dim(w, i, keepdims=False))


def xla_fp8_matmul(per_row: bool):
    def run(x, w, s, i):
        x8, sx = quantize_rows(x, per_row)
        out = lax.dot_general(x8, lax.dynamic_index_in_dim(w, i, keepdims=False), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
        return (out * sx * s[i]).astype(jnp.bfloat16)
    return run


def kernel_matmul(sizes: GemmSizes | None = None):
    def run(x, w, s, i):
        x8, sx = quantize_rows(x, True)
        return fp8_matmul(x8, w, i, sizes, x_scale=sx, w_scale=s, out_dtype=jnp.bfloat16)
    return run


def parse_sizes(text: str) -> GemmSizes:
    """`GemmSizes` from `field=value,field=value` (e.g. `tile_n=64,splits=2`)."""
    return GemmSizes(**{k: int(v) for k, v in (item.split("=") for item in text.split(","))})


def w8a16_matmul(x, w, s, i):
    wi = lax.dynamic_index_in_dim(w, i, keepdims=False).astype(jnp.bfloat16)
    return (lax.dot_general(x, wi, (((1,), (1,)), ((), ()))).astype(jnp.float32) * s[i]).astype(jnp.bfloat16)


def layer_loop(matmul):
    """Run `matmul(x, w, s, i)` for every layer i of w, as the model's layer loop does."""
    def run(x, w, s):
        def body(i, acc):
            return acc + matmul(x, w, s, i)[:, :8].astype(jnp.float32)
        return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], 8), jnp.float32))
    return jax.jit(run)


def gemm_calls(fn, *args) -> list[str]:
    """The custom calls XLA compiled `fn` into (cuBLAS, cuBLASLt FP8, Mosaic GPU kernels)."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', fn.lower(*args).compile().as_text())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=["bf16", "fp8_row", "kernel"])
    parser.add_argument("--sizes", nargs="*", default=[], help="kernel variants with these GemmSizes, e.g. "
                        "tile_n=64,splits=2")
    parser.add_argument("--json")
    args = parser.parse_args()
    every = {"bf16": bf16_matmul, "fp8_row": xla_fp8_matmul(True), "fp8_tensor": xla_fp8_matmul(False),
             "kernel": kernel_matmul(), "w8a16": w8a16_matmul}
    variants = {name: every[name] for name in args.variants}
    variants.update({f"kernel[{text}]": kernel_matmul(parse_sizes(text)) for text in args.sizes})
    rows_out = []
    for name in args.shapes:
        k, n, layers = SHAPES[name]
        key = jax.random.key(hash(name) % 1000)
        w16 = jax.random.normal(key, (layers, k, n), jnp.bfloat16) * 0.02
        s = jnp.max(jnp.abs(w16.astype(jnp.float32)), axis=1) / F8_MAX  # one scale an output channel: [layers, N]
        w8 = jnp.clip(jnp.swapaxes(w16, 1, 2).astype(jnp.float32) / s[:, :, None], -F8_MAX, F8_MAX).astype(F8)
        for rows in args.rows:
            x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.bfloat16)
            last = layers - 1  # checked at the last layer: a kernel reading the wrong layer fails
            ref = jnp.dot(x.astype(jnp.float32), (w8[last].astype(jnp.float32) * s[last][:, None]).T)
            ref16 = jnp.dot(x.astype(jnp.float32), w16[last].astype(jnp.float32))
            for vname, matmul in variants.items():
                w = w16 if vname == "bf16" else w8
                fn = layer_loop(matmul)
                t = gpu_time(fn, x, w, s) / layers
                nbytes = w[0].nbytes
                out = jax.jit(matmul)(x, w, s, last).astype(jnp.float32)
                expected = ref16 if vname == "bf16" else ref
                err = float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected))
                calls = gemm_calls(fn, x, w, s)
                print(f"{name} rows={rows} {vname}: {t * 1e6:.1f} us ({nbytes / t / 1e12:.2f} TB/s) "
                      f"err {err:.1e}; calls {calls}")
                rows_out.append(dict(shape=name, rows=rows, variant=vname, us=t * 1e6, tbs=nbytes / t / 1e12,
                                     err=err, calls=calls))
    print_grid(rows_out, ("shape", "rows"), args.shapes, args.rows, list(variants), cell=lambda r: f"{r['us']:.1f}")
    save_rows(args.json, rows_out)


if __name__ == "__main__":
    main()
