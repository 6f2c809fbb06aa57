"""Building blocks shared by the decoder models: parameters with logical axes, projections, RMSNorm, rotary
embeddings."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import RopeConfig
from jaxllm.models.quantization import Fp8Weight, fp8_linear


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype,
          stack: int | None = None, init: str = "normal") -> nnx.Param:
    """An `nnx.Param` carrying its logical axis names; `stack` prepends a `layers` axis of that size."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def pad_stacked(module: nnx.Module, size: int) -> None:
    """Grow every parameter's leading `layers` axis to `size` with zeros. A decoder layer whose weights are
    all zero is an exact identity (its attention and MLP add zeros to the residual stream), so pipeline
    stages can hold equal layer counts whatever the model's depth."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            value = var[...]
            widths = [(0, size - value.shape[0])] + [(0, 0)] * (value.ndim - 1)
            var.set_value(jnp.pad(value, widths))


def linear(x: jax.Array, w: nnx.Param | Fp8Weight, num_in: int = 1, layer: jax.Array | None = None) -> jax.Array:
    """`x [..., *in]` times a projection weight `[*in, *out]` (or its FP8 form): `[..., *out]`. `layer`: the
    FP8 weight is the whole layer stack, read at that layer in place (`quantization.fp8_linear`)."""
    if isinstance(w, Fp8Weight):
        return fp8_linear(x, w, layer)
    return jax.lax.dot_general(x, w[...], ((tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in))), ((), ())))


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm computed in float32, as `transformers` does, then scaled in the input dtype (`weight=None`: the
    scale is already in the weights that read the output)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(x.dtype) if weight is None else weight * x32.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies for `default`, `linear` and `llama3` rotary scaling."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)` `[T, 1, D/2]` of each row's rotation angles; computed once per step, used by every layer."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(freqs)[:, None, :], jnp.sin(freqs)[:, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate `x [T, heads, D]` by its `rope_tables`, in the half-split layout `transformers` uses."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
