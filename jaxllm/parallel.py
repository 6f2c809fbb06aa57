"""The device mesh and the one table that maps logical axis names onto it.

Every parameter and the KV cache name their axes logically (`embed`, `q_heads`, `kv_heads`, `mlp`,
`vocab`, `layers`, ...). `ShardingRules` maps each name to a mesh axis (`data`, `pipeline`, `tensor`) or to
nothing (replicated); changing a parallel layout means changing this table, not the model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "pipeline", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name (None: replicated)."""

    vocab: str | None = "tensor"
    embed: str | None = None
    q_heads: str | None = "tensor"
    kv_heads: str | None = "tensor"
    head_dim: str | None = None
    mlp: str | None = "tensor"
    layers: str | None = "pipeline"
    kv_pages: str | None = None
    page: str | None = None
    tokens: str | None = None

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None:
            return None
        if not hasattr(self, logical):
            raise KeyError(f"logical axis {logical!r} has no sharding rule")
        return getattr(self, logical)


def make_mesh(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data x pipeline x tensor` mesh over the first devices (all local devices by default)."""
    shape = (data_parallel_size, pipeline_parallel_size, tensor_parallel_size)
    needed = int(np.prod(shape))
    devices = list(devices if devices is not None else jax.devices())
    if needed > len(devices):
        raise ValueError(
            f"mesh data={shape[0]} x pipeline={shape[1]} x tensor={shape[2]} needs {needed} devices, "
            f"only {len(devices)} available"
        )
    return Mesh(np.asarray(devices[:needed]).reshape(shape), MESH_AXES)


def partition_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   rules: ShardingRules) -> PartitionSpec:
    """The spec for an array; an axis whose size the mesh axis does not divide is replicated instead, and a
    mesh axis of size 1 is left out (the same layout, and the same spec as before that axis was used)."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    spec = []
    for size, logical in zip(shape, logical_axes):
        axis = rules.mesh_axis(logical)
        if axis is not None and mesh.shape[axis] == 1:
            axis = None
        if axis is not None and size % mesh.shape[axis] != 0:
            logger.info("replicating %s (size %d) over mesh axis %s of size %d", logical, size, axis,
                        mesh.shape[axis])
            axis = None
        spec.append(axis)
    return PartitionSpec(*spec)


def named_sharding(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   rules: ShardingRules) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(shape, logical_axes, mesh, rules))


def padded_layers(num_layers: int, num_stages: int) -> int:
    """The stacked layer count: `num_layers` rounded up to a multiple of the pipeline stages, so that every
    stage holds as many layers (the extra ones, at the end of the last stages, are zero, i.e. identities)."""
    return -(-num_layers // num_stages) * num_stages


KV_CACHE_AXES = ("layers", "kv_pages", "page", "kv_heads", "head_dim")


def kv_cache_sharding(shape: Sequence[int], mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    """Sharding of the `[layers, pages, page, 2*kv_heads, head_dim]` cache: split by whole KV heads only."""
    per_head = (*shape[:3], shape[3] // 2, shape[4])
    return NamedSharding(mesh, partition_spec(per_head, KV_CACHE_AXES, mesh, rules))
