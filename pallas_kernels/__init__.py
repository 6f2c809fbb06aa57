"""Ragged paged attention: one signature, chosen implementation by backend.

`ragged_paged_attention(q, k, v, kv_cache, metadata, layer, sm_scale=..., sliding_window=...,
soft_cap=..., backend=...)` writes this step's K/V into the paged cache and attends every query row of a
ragged batch (mixed prefill and decode) over its sequence. See `metadata.py` for the batch layout.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import gpu, reference, tpu
from pallas_kernels.metadata import AttentionMetadata, kv_cache_shape, token_layout

_BACKENDS: dict[str, Callable] = {"reference": reference.ragged_paged_attention,
                                  "pallas_tpu": tpu.ragged_paged_attention,
                                  "pallas_gpu": gpu.ragged_paged_attention}
BACKEND_ENV = "JAXLLM_ATTENTION_BACKEND"


def resolve_backend(name: str = "auto", dtype=None) -> str:
    """Pick the implementation for `name`. `auto` honours `JAXLLM_ATTENTION_BACKEND`, else takes the Mosaic TPU
    kernel on TPUs, the Mosaic GPU kernel on Hopper GPUs for 16-bit models (`dtype`; its tensor-core path
    reads 16-bit K/V only) and the reference elsewhere. The Pallas backends run in their interpreters off
    their hardware: slow, but the same results."""
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto")
    if name == "auto":
        return _auto_backend(dtype)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: auto, {', '.join(_BACKENDS)}")
    return name


def _auto_backend(dtype) -> str:
    device = jax.devices()[0]
    if device.platform == "tpu":
        return "pallas_tpu"
    sixteen_bit = dtype is not None and jnp.dtype(dtype).itemsize == 2
    if device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0" and sixteen_bit:
        return "pallas_gpu"
    return "reference"


def ragged_paged_attention(q, k, v, kv_cache, md: AttentionMetadata, layer=0, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           backend: str = "auto"):
    """Returns `(out [T, H, D], kv_cache')`; the cache is updated in place when donated by the caller."""
    impl = _BACKENDS[resolve_backend(backend)]
    return impl(q, k, v, kv_cache, md, layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)


__all__ = ["AttentionMetadata", "kv_cache_shape", "ragged_paged_attention", "resolve_backend", "token_layout"]
