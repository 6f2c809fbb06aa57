"""Pipeline parallelism inside the one compiled step: a GPipe schedule over the mesh's `pipeline` axis.

The stacked decoder layers and the KV cache's layer axis are split into equal stages along `pipeline`
(`parallel.padded_layers` pads the depth with identity layers when it does not divide). The step's ragged
token batch is cut into micro-batches of equal row counts (one per stage when each holds at least
`MIN_MICROBATCH_ROWS` rows, fewer otherwise); in tick `t` stage `s` runs its own layers on micro-batch
`t - s` and hands the activations to stage `s + 1` (`ppermute`), so after
`micro-batches + stages - 1` ticks every micro-batch has passed every stage and the stages worked side by
side in between. Only activations move between stages; weights and cache pages stay where they are.

Micro-batches are equal slices of the token rows, not groups of whole sequences: a sequence cut between two
micro-batches is a chunked prefill whose first part reaches each layer one tick before its second part,
so its K/V are already in that layer's pages when the second part attends. Each micro-batch gets its own
`AttentionMetadata` (the sequences it overlaps, their query rows in it and their KV lengths up to its last
row). Equal slices keep every tick the same size; whole-sequence groups would need each micro-batch padded
to the longest prefill.

The `tensor` and `data` axes stay automatic inside the `shard_map`, so tensor parallelism works within
each stage as without pipelining.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import AttentionMetadata

PIPELINE_AXIS = "pipeline"
# Measured with benchmarks/pipeline_step.py (Llama-3.1-8B, bfloat16, 2 x H200, pipeline 2; one device:
# 60.5 ms prefill, 27.5 ms decode): 2048-token prefill 62.2 / 56.4 / 65.5 ms with 1 / 2 / 4 micro-batches,
# 256-sequence decode 28.7 / 35.5 / 53.8 ms.
MIN_MICROBATCH_ROWS = 1024

# (stage params, x [rows, E], positions [rows], local kv cache, metadata) -> (x, local kv cache)
StageFn = Callable[..., tuple[jax.Array, jax.Array]]


def num_microbatches(num_tokens: int, num_stages: int) -> int:
    """Micro-batches per step: one per stage (GPipe's smallest count that lets every stage work at once), but
    none smaller than `MIN_MICROBATCH_ROWS`. Each extra micro-batch reads every stage's weights once more, so
    small (decode) steps run as one micro-batch passed from stage to stage."""
    return max(1, min(num_stages, num_tokens // MIN_MICROBATCH_ROWS))


def microbatch_metadata(md: AttentionMetadata, count: int, rows: int) -> AttentionMetadata:
    """The metadata of each of the `count` slices of `rows` rows of the batch, stacked on a leading axis.

    Micro-batch `m` covers rows `[m * rows, (m + 1) * rows)`. The sequences it overlaps are a contiguous
    range of the batch's; they are moved to the front, each with the query rows that fall in the slice and
    the KV length up to the slice's end, so positions and causal masks are those of the whole batch."""
    seqs = jnp.arange(md.max_num_seqs)
    real = seqs < md.num_seqs[0]
    starts = jnp.where(real, md.cu_q_lens[:-1], 0)
    ends = jnp.where(real, md.cu_q_lens[1:], 0)

    def one(m: jax.Array) -> AttentionMetadata:
        first_row, end_row = m * rows, (m + 1) * rows
        first = jnp.sum(real & (ends <= first_row))
        num_seqs = jnp.sum(real & (starts < end_row)) - first
        source = jnp.minimum(first + seqs, md.max_num_seqs - 1)
        present = seqs < num_seqs
        lo = jnp.clip(starts, first_row, end_row)[source]
        hi = jnp.clip(ends, first_row, end_row)[source]
        q_lens = jnp.where(present, hi - lo, 0)
        kv_lens = jnp.where(present, md.kv_lens[source] - (ends[source] - hi), 0)
        cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens, dtype=jnp.int32)])
        return AttentionMetadata(cu_q_lens, kv_lens.astype(jnp.int32), md.page_indices[source],
                                 num_seqs.astype(jnp.int32)[None])

    return jax.vmap(one)(jnp.arange(count))


def run_pipeline(stage_fn: StageFn, stage_params, x: jax.Array, positions: jax.Array, kv_cache: jax.Array,
                 md: AttentionMetadata, num_stages: int) -> tuple[jax.Array, jax.Array]:
    """Run the layers of every stage over the batch `x [T, E]`; returns `(x, kv_cache)` like one scan would.

    `stage_params` (every leaf with a leading layers axis) and `kv_cache` are split over `pipeline`; the
    mesh is the one the cache lives on."""
    mesh = jax.typeof(kv_cache).sharding.mesh
    if mesh.empty or mesh.shape.get(PIPELINE_AXIS) != num_stages:
        raise ValueError(f"the model has {num_stages} pipeline stages but its KV cache is not split over a "
                         f"'{PIPELINE_AXIS}' mesh axis of that size")
    num_tokens, embed = x.shape
    count = num_microbatches(num_tokens, num_stages)
    rows = -(-num_tokens // count)
    pad = count * rows - num_tokens
    x_mb = jnp.pad(x, ((0, pad), (0, 0))).reshape(count, rows, embed)
    positions_mb = jnp.pad(positions, (0, pad)).reshape(count, rows)
    md_mb = microbatch_metadata(md, count, rows)
    stages = PartitionSpec(PIPELINE_AXIS)
    body = jax.shard_map(
        lambda p, xs, ps, kv, mds: _schedule(stage_fn, p, xs, ps, kv, mds, num_stages),
        mesh=mesh, in_specs=(stages, PartitionSpec(), PartitionSpec(), stages, PartitionSpec()),
        out_specs=(PartitionSpec(), stages), axis_names={PIPELINE_AXIS}, check_vma=False)
    out, kv_cache = body(stage_params, x_mb, positions_mb, kv_cache, md_mb)
    return out.reshape(count * rows, embed)[:num_tokens], kv_cache


def _schedule(stage_fn: StageFn, params, x_mb: jax.Array, positions_mb: jax.Array, kv_cache: jax.Array,
              md_mb: AttentionMetadata, num_stages: int) -> tuple[jax.Array, jax.Array]:
    """One stage's view of the GPipe schedule (inside `shard_map`: local layers and cache, all micro-batches).

    Ticks where this stage has no micro-batch still compute (stages run in lockstep) but on metadata with no
    sequences, so they write nothing to the cache; only the last stage's results are kept."""
    count = x_mb.shape[0]
    stage = jax.lax.axis_index(PIPELINE_AXIS)
    last = stage == num_stages - 1
    forward = [(s, s + 1) for s in range(num_stages - 1)]

    def tick(carry, t):
        inbox, kv_cache, outs = carry
        m = t - stage
        active = (m >= 0) & (m < count)
        m = jnp.clip(m, 0, count - 1)
        md = jax.tree.map(lambda a: a[m], md_mb)
        md = AttentionMetadata(md.cu_q_lens, md.kv_lens, md.page_indices, jnp.where(active, md.num_seqs, 0))
        y, kv_cache = stage_fn(params, jnp.where(stage == 0, x_mb[m], inbox), positions_mb[m], kv_cache, md)
        outs = outs.at[m].set(jnp.where(active & last, y, outs[m]))
        return (jax.lax.ppermute(y, PIPELINE_AXIS, forward), kv_cache, outs), None

    init = (jnp.zeros_like(x_mb[0]), kv_cache, jnp.zeros_like(x_mb))
    (_, kv_cache, outs), _ = jax.lax.scan(tick, init, jnp.arange(count + num_stages - 1))
    # Zeros everywhere but on the last stage, so the sum is exact. Summed in float32: XLA's CPU compiler
    # fails on a bfloat16 all-reduce here (AllReducePromotion: "Invalid binary instruction opcode copy").
    return jax.lax.psum(outs.astype(jnp.float32), PIPELINE_AXIS).astype(outs.dtype), kv_cache
