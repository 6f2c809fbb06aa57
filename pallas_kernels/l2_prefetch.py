"""Start pulling one layer of a stacked weight into a Hopper GPU's L2 cache, so that a GEMM a few kernels later
reads it from L2 instead of HBM.

Why: at batch-1 decode the GEMMs stream their weights from HBM, and between them run small kernels (norms,
RoPE, the K/V write, attention, the split merge) during which HBM is idle. A TMA L2 prefetch
(`cp.async.bulk.prefetch.tensor...L2`) is fire and forget: this kernel only issues the requests and exits, and
the memory system fills L2 while the next kernels run. Nothing is read or written, so the results are the same
with or without it; off a Hopper GPU `prefetch_layer` does nothing.

`prefetch_layer(stacked, layer, after)` returns `after`, ordered after the prefetch kernel, which is itself
ordered after `after` is computed: so a caller puts the prefetch between two given kernels of its step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

# `plgpu.kernel` without its input-output aliases: this kernel's output is its input `after`, in place
from jax._src.pallas.mpmd import _mpmd_map
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_BOX = 256  # a TMA box holds at most 256 elements along each dimension
_MAX_BLOCKS = 132  # H100 SXM's SMs: one block each issues its share of the boxes
_COMPILER_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True)
class _Boxes:
    rows: int  # box rows (of K)
    cols: int  # box columns (of N)
    row_boxes: int  # boxes along K that are prefetched (the leading `fraction` of the rows)
    col_boxes: int
    blocks: int

    @property
    def per_block(self) -> int:
        return -(-self.row_boxes * self.col_boxes // self.blocks)


def prefetch_layer(stacked: jax.Array, layer: jax.Array, after: jax.Array, fraction: float = 1.0) -> jax.Array:
    """`after`, once a kernel has asked L2 for the leading `fraction` of `stacked[layer]` (`stacked [L, ...]`,
    seen as `[L, K, N]` with N its last axis). Only on GPUs; elsewhere `after` as it is."""
    if jax.default_backend() != "gpu" or fraction <= 0:
        return after
    weights = stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])  # a bitcast: no copy
    boxes = _boxes(weights.shape[1], weights.shape[2], fraction)
    mesh = plgpu.Mesh(grid=(boxes.blocks,), grid_names=("blocks",))
    call = _mpmd_map([(mesh, functools.partial(_kernel, boxes=boxes))], jax.ShapeDtypeStruct(after.shape, after.dtype),
                     input_output_aliases={2: 0}, compiler_params=_COMPILER_PARAMS, name="l2_prefetch")
    return call(jnp.asarray(layer, jnp.int32).reshape(1), weights, after)


def _boxes(k: int, n: int, fraction: float) -> _Boxes:
    rows, cols = min(k, _BOX), min(n, _BOX)
    if k % rows or n % cols:
        raise ValueError(f"a [{k}, {n}] weight does not split into TMA boxes of [{rows}, {cols}]")
    row_boxes = max(1, round(k // rows * min(fraction, 1.0)))
    return _Boxes(rows, cols, row_boxes, n // cols, min(_MAX_BLOCKS, row_boxes * (n // cols)))


def _kernel(layer_ref, w_ref, after_ref, out_ref, *, boxes: _Boxes):
    del after_ref, out_ref  # `after` passes through in place (aliased): it only orders the kernel
    layer, block = layer_ref[0], lax.axis_index("blocks")
    for i in range(boxes.per_block):
        box = block + i * boxes.blocks

        @pl.when(box < boxes.row_boxes * boxes.col_boxes)
        def _prefetch():
            row, col = box // boxes.col_boxes, box % boxes.col_boxes
            plgpu.async_prefetch(w_ref.at[layer, pl.ds(row * boxes.rows, boxes.rows),
                                          pl.ds(col * boxes.cols, boxes.cols)])
