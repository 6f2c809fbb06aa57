"""FP8 weights made at load time from a 16- or 32-bit checkpoint (vLLM's `--quantization fp8`).

The decoder layers' projections (q/k/v, o, gate/up, down) become float8_e4m3fn with one float32 scale per
output channel; embeddings, norms, biases and the LM head stay in the model's dtype, as in vLLM. Each GEMM
quantizes its input on the fly with one scale per token (vLLM's dynamic per-token activation scales), runs on
8-bit operands and scales its output by both scales. A quantized weight is stored with its contracted axes last
(`[*out, *in]`, PyTorch's `[out, in]`), the layout FP8 tensor-core GEMMs take. On one Hopper GPU the model hands
the whole layer stacks to `pallas_kernels.fp8_gemm`, which reads each layer in place (half the bytes of a
bfloat16 weight: what bounds decode); elsewhere XLA's FP8 GEMMs (cuBLASLt on GPUs) get each layer's slice, which
XLA copies first on GPUs.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh

from jaxllm.parallel import ShardingRules, named_sharding
from pallas_kernels import fp8_gemm

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("fp8",)
FP8 = fp8_gemm.FP8
FP8_MAX = float(jnp.finfo(FP8).max)
_MIN_SCALE = 1e-12 / FP8_MAX  # the scale of an all-zero row or channel (identity layers, padding rows)

# (module path under the model, parameter name): how many leading axes of the 16-bit weight are its input.
PROJECTIONS = {
    (("layers", "attn"), "qkv_proj"): 1,
    (("layers", "attn"), "o_proj"): 2,
    (("layers", "mlp"), "gate_up_proj"): 1,
    (("layers", "mlp"), "down_proj"): 1,
}


class Fp8Param(nnx.Param):
    """A float8 projection weight or its scales: the layer loop can hand these over whole, for `fp8_gemm` to read
    one layer of in place."""


class Fp8Weight(nnx.Module):
    """A projection weight `[*out, *in]` in float8_e4m3fn and its float32 scales `[*out]` (weight ~ q * scale).
    Stacked layers put a `layers` axis first on both."""

    def __init__(self, weight: Fp8Param, scale: nnx.Param, num_in: int):
        self.weight = weight
        self.scale = scale
        self.num_in = num_in


def quantize(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """`x` in float8_e4m3fn and float32 scales (the amax over `axes` / 448, kept as size-1 axes): x ~ q * s."""
    x32 = x.astype(jnp.float32)
    # One reduction whose initial value is the smallest scale: the scale comes out of the reduction's own kernel
    # (max(|x| / 448) is max(|x|) / 448 exactly: the rounded division is monotonic).
    scale = lax.reduce(jnp.abs(x32) / FP8_MAX, np.float32(_MIN_SCALE), lax.max, axes)
    scale = lax.expand_dims(scale, axes)
    return jnp.clip(x32 / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def quantize_weight(w: jax.Array, num_in: int) -> tuple[jax.Array, jax.Array]:
    """A 16-bit weight `[*in, *out]` as `([*out, *in]` float8, `[*out]` float32 scales), one scale per output
    channel."""
    num_out = w.ndim - num_in
    moved = jnp.moveaxis(w, tuple(range(num_in)), tuple(range(num_out, w.ndim)))
    q, scale = quantize(moved, tuple(range(num_out, w.ndim)))
    return q, scale.reshape(scale.shape[:num_out])


def fp8_linear(x: jax.Array, w: Fp8Weight, layer: jax.Array | None = None) -> jax.Array:
    """`x [T, *in] @ w -> [T, *out]` in x's dtype: x quantized per token, an 8-bit GEMM, both scales after.
    With `layer`, `w.weight` and `w.scale` are the whole layer stacks and `fp8_gemm` reads that layer of them in
    place, applying the scales itself."""
    if layer is not None:
        return _streamed_fp8_linear(x, w, layer)
    n = w.num_in
    x_axes = tuple(range(x.ndim - n, x.ndim))
    xq, x_scale = quantize(x, x_axes)
    out_shape = w.scale.shape
    product = lax.dot_general(xq, w.weight[...], ((x_axes, tuple(range(len(out_shape), w.weight.ndim))), ((), ())),
                              preferred_element_type=x.dtype)
    x_scale = x_scale.reshape(x.shape[:-n] + (1,) * len(out_shape))
    return (product.astype(jnp.float32) * x_scale * w.scale[...]).astype(x.dtype)


def _streamed_fp8_linear(x: jax.Array, w: Fp8Weight, layer: jax.Array) -> jax.Array:
    """`fp8_linear` through `fp8_gemm`, reading `layer` of the whole stacks. x is padded to the kernel's rows
    before it is quantized, so that XLA pads it in the quantization's own kernels."""
    stack, scales = w.weight[...], w.scale[...]
    out_shape = scales.shape[1:]
    rows = x.reshape(x.shape[0], -1)
    xq, x_scale = quantize(jnp.pad(rows, ((0, fp8_gemm.padded_rows(x.shape[0]) - x.shape[0]), (0, 0))), (1,))
    product = fp8_gemm.fp8_matmul(xq, stack.reshape(stack.shape[0], math.prod(out_shape), -1), layer,
                                  x_scale=x_scale, w_scale=scales.reshape(scales.shape[0], -1), out_dtype=x.dtype,
                                  num_rows=x.shape[0])
    return product.reshape(x.shape[:1] + out_shape)


def streams_in_place(stacked: list[Fp8Weight], rows: int) -> bool:
    """Whether `fp8_gemm` takes every stacked FP8 weight (`[L, *out, *in]`) at `rows` tokens a step."""
    def flat(w: Fp8Weight) -> tuple[int, int, int]:
        shape = w.weight.shape
        return shape[0], math.prod(shape[1:-w.num_in]), math.prod(shape[-w.num_in:])
    return bool(stacked) and all(fp8_gemm.supported(rows, flat(w)) for w in stacked)


def check_method(quantization: str | None) -> None:
    """Refuse a method jaxllm does not have, naming the ones it has."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {quantization!r} is not supported; choose one of "
                         f"{', '.join(QUANTIZATION_METHODS)} (or none)")


def quantize_model(model: nnx.Module, quantization: str, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> None:
    """Replace the decoder projections of a loaded model by `Fp8Weight`s, in place, each made on the devices in
    its sharding, one parameter at a time (the 16-bit one is freed as its quantized form is placed).
    `quantization` is a checked method (`check_method`)."""
    for (module_path, name), num_in in PROJECTIONS.items():
        module = functools.reduce(getattr, module_path, model)
        var = getattr(module, name)
        quantized = _quantized(var, num_in, mesh, rules)
        jax.block_until_ready(quantized.weight[...])
        var[...].delete()
        setattr(module, name, quantized)
    _repack(model)
    logger.info("quantized the decoder projections to %s", quantization)


def _repack(model: nnx.Module) -> None:
    """Move every parameter's shards to the host and back, so that they lie together again. The 16-bit weights
    left holes between the FP8 ones, and the KV cache, one buffer, must fit in a single free block: on an 8B
    model on an H100 about 11 GB stayed in holes, and the FP8 engine got fewer cache pages than the bfloat16 one.
    Shard by shard, so that arrays spanning several hosts move too."""
    state = nnx.state(model)
    arrays, tree = jax.tree.flatten(state)
    layouts = [(a.shape, a.sharding, [(s.device, np.asarray(s.data)) for s in a.addressable_shards]) for a in arrays]
    for array in arrays:
        array.delete()
    placed = [jax.make_array_from_single_device_arrays(shape, sharding, [jax.device_put(h, d) for d, h in shards])
              for shape, sharding, shards in layouts]
    nnx.update(model, jax.tree.unflatten(tree, placed))


def _quantized(var: nnx.Param, num_in: int, mesh: Mesh, rules: ShardingRules) -> Fp8Weight:
    """One stacked `[layers, *in, *out]` parameter quantized layer by layer (`lax.map` bounds the float32
    temporaries to one layer)."""
    axes = var.logical_axes
    in_axes, out_axes = axes[1:1 + num_in], axes[1 + num_in:]
    q_axes, s_axes = (axes[0], *out_axes, *in_axes), (axes[0], *out_axes)
    value = var[...]
    num_out = value.ndim - 1 - num_in
    q_shape = (value.shape[0], *value.shape[1 + num_in:], *value.shape[1:1 + num_in])
    shardings = (named_sharding(q_shape, q_axes, mesh, rules), named_sharding(q_shape[:1 + num_out], s_axes, mesh,
                                                                              rules))
    q, scale = jax.jit(lambda w: lax.map(lambda layer: quantize_weight(layer, num_in), w),
                       out_shardings=shardings)(value)
    return Fp8Weight(Fp8Param(q, logical_axes=q_axes), Fp8Param(scale, logical_axes=s_axes), num_in)
