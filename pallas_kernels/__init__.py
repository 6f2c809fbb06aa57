"""Ragged paged attention: one signature, chosen implementation by backend.

`ragged_paged_attention(q, k, v, kv_cache, metadata, layer, sm_scale=..., sliding_window=...,
soft_cap=..., backend=..., plan=...)` writes this step's K/V into the paged cache and attends every query
row of a ragged batch (mixed prefill and decode) over its sequence. See `metadata.py` for the batch layout.
A model calls `plan_attention` once per step and hands the plan to every layer's call, so that what the
batch layout implies (each row's sequence, position and page; the GPU kernel's tiles) is computed once, not
once per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import gpu, reference, tpu
from pallas_kernels.metadata import AttentionMetadata, AttentionPlan, kv_cache_shape, plan_rows, token_layout

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


def plan_attention(md: AttentionMetadata, num_tokens: int, *, page_size: int, group: int,
                   backend: str = "auto") -> AttentionPlan:
    """The step's `AttentionPlan` for `backend` (`group`: query heads per KV head)."""
    if resolve_backend(backend) == "pallas_gpu":
        return gpu.plan_step(md, num_tokens, page_size, group)
    return plan_rows(md, num_tokens, page_size)


def ragged_paged_attention(q, k, v, kv_cache, md: AttentionMetadata, layer=0, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           backend: str = "auto", heads_axis: str | None = None,
                           block_sizes: tuple[tuple[str, int], ...] | None = None,
                           plan: AttentionPlan | None = None, cache_format: str | None = None):
    """Returns `(out [T, H, D], kv_cache')`; the cache is updated in place when donated by the caller.

    `cache_format`: for a cache of bytes (uint8), the 8-bit float type its entries hold (`float8_e4m3fn` or
    `float8_e5m2`; `reference.cache_values` says why bytes); None for a cache of its values' own dtype.

    `plan`: the step's `plan_attention` for this backend (None: derived here, for this call alone).

    `block_sizes`: `(field, value)` pairs of the Pallas kernel's `BlockSizes` (None: its defaults).
    `heads_axis`: the mesh axis the heads (of q, k, v and the cache) are split over. A Pallas kernel is
    opaque to XLA's partitioner, which would gather every head onto every device around it; so each
    device runs the kernel on its own heads (`shard_map`), as attention needs nothing from other heads."""
    name = resolve_backend(backend)
    if (kv_cache.dtype == jnp.uint8) != (cache_format is not None):
        raise ValueError(f"a cache of bytes needs its 8-bit float cache_format and only it takes one, got a "
                         f"{kv_cache.dtype} cache and cache_format={cache_format!r}")
    impl = functools.partial(_BACKENDS[name], sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                             cache_format=cache_format, **_sizes(name, block_sizes))
    if name != "reference" and heads_axis is not None and not _interpreted_gpu_kernel(name):
        impl = _per_device_heads(impl, kv_cache, heads_axis)
    if plan is None:
        group = q.shape[1] * 2 // kv_cache.shape[3]
        plan = plan_attention(md, q.shape[0], page_size=kv_cache.shape[2], group=group, backend=name)
    return impl(q, k, v, kv_cache, md, jnp.asarray(layer, jnp.int32), plan=plan)


def attend_grouped(q_rows, q_shape: tuple[int, ...], kv_cache, md: AttentionMetadata, layer, *, sm_scale: float,
                   sliding_window: int | None = None, soft_cap: float | None = None,
                   block_sizes: tuple[tuple[str, int], ...] | None = None, plan: AttentionPlan,
                   cache_format: str | None = None) -> jax.Array:
    """The Mosaic GPU kernel's attention `[T, H, D]` (`q_shape`) of queries already in its grouped layout
    `[KVH, rows, D]`, over a cache that already holds this step's K/V: both written by `norm_rope_write` with
    `plan` (`plan_attention(..., backend="pallas_gpu")`). One device's heads: the caller runs it unsharded.
    `cache_format`: as for `ragged_paged_attention`."""
    return gpu.attend_grouped(q_rows, q_shape, kv_cache, md, jnp.asarray(layer, jnp.int32), sm_scale=sm_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap,
                              sizes=_sizes("pallas_gpu", block_sizes).get("sizes", gpu.BlockSizes()), plan=plan,
                              cache_format=cache_format)


def _sizes(name: str, block_sizes: tuple[tuple[str, int], ...] | None) -> dict:
    """The `sizes=` argument of a Pallas kernel from `(field, value)` pairs (`attention_block_sizes`)."""
    if not block_sizes:
        return {}
    if name == "reference":
        raise ValueError("attention_block_sizes apply to the Pallas kernels, not to the reference backend")
    module = gpu if name == "pallas_gpu" else tpu
    fields = {f.name for f in dataclasses.fields(module.BlockSizes)}
    unknown = sorted(set(dict(block_sizes)) - fields)
    if unknown:
        raise ValueError(f"attention_block_sizes: {', '.join(unknown)} not block sizes of {name} "
                         f"(they are: {', '.join(sorted(fields))})")
    return {"sizes": module.BlockSizes(**dict(block_sizes))}


def _interpreted_gpu_kernel(name: str) -> bool:
    """JAX's GPU interpreter simulates one device's shared memory at a time; there the kernel runs on all
    heads (XLA gathers them: slower, same results)."""
    return name == "pallas_gpu" and jax.default_backend() != "gpu"


def _per_device_heads(impl: Callable, kv_cache: jax.Array, axis: str) -> Callable:
    """`impl` run by each device of `axis` on its slice of the heads, when the cache's heads are split there."""
    mesh = jax.typeof(kv_cache).sharding.mesh
    size = 1 if mesh.empty or axis not in mesh.axis_names else mesh.shape[axis]
    if size == 1 or (kv_cache.shape[3] // 2) % size:
        return impl  # heads not split (one device, or too few KV heads: they are replicated)
    heads, cache, same = PartitionSpec(None, axis), PartitionSpec(None, None, None, axis), PartitionSpec()
    # Manual over every axis not manual already (interpret-mode callbacks refuse partly automatic meshes);
    # the other axes hold whole copies of these arrays.
    manual = set(mesh.axis_names) - set(mesh.manual_axes)
    per_device = jax.shard_map(lambda q, k, v, c, md, layer, plan: impl(q, k, v, c, md, layer, plan=plan),
                               mesh=mesh, in_specs=(heads, heads, heads, cache, same, same, same),
                               out_specs=(heads, cache), axis_names=manual, check_vma=False)
    return lambda q, k, v, c, md, layer, plan: per_device(q, k, v, c, md, layer, plan)  # `plan` by keyword


__all__ = ["AttentionMetadata", "AttentionPlan", "attend_grouped", "kv_cache_shape", "plan_attention",
           "ragged_paged_attention", "resolve_backend", "token_layout"]
