"""Ragged paged attention for Hopper GPUs as a Mosaic GPU Pallas kernel (GPU interpreter elsewhere).

Unit of work: one CUDA block per (KV head, query tile, KV split). A query tile holds up to 64 query rows of
one sequence: `64 // G` consecutive tokens times the G query heads that share the KV head, laid out
token-major. So every tile is one M=64 tensor-core (wgmma) operand, whether it holds a decode token (G
rows) or a prefill chunk. The tile's K/V pages are gathered by TMA into shared memory `num_stages` blocks
ahead of the tensor cores (one copy per page and K/V, all completing on the block's barrier). Long
contexts are split over `num_splits` blocks (flash-decoding), whose partial outputs are merged by their
log-sum-exp (`merge_splits`, one Pallas Triton kernel, for 16-bit outputs; XLA for float32). New K/V rows are
written into their pages before the kernel (an in-place scatter on the donated cache), as the TPU kernel does;
a model may instead write them with its queries already grouped (`norm_rope_write`, then `attend_grouped`).
A tile of at most 8 rows (a decode token's heads) moves only that one 8-row TMA tile of queries in and of
output out, and 16-bit P reaches P.V from registers.

Where the time goes (`benchmarks/attention_anatomy.py`, `attention_ncu.py`; H100): at decode shapes the
kernel is bound by HBM reads (about 82% of the DRAM peak under Nsight Compute); its arithmetic is hidden (the
copies alone take as long), and neither more stages, an L2 prefetch nor a denser cache layout helped.

16-bit inputs (bfloat16, float16) go to the tensor cores as stored. float32 inputs are split into
bfloat16 high and low halves (x = hi + lo) and each product is taken as hi.hi + hi.lo + lo.hi, about 16
mantissa bits: wgmma reads V as stored (token-major) only for 16-bit operands, so float32 cannot use its
tf32 mode here, and tf32 alone would be too coarse for float32 models anyway. An 8-bit float cache
(`--kv-cache-dtype fp8`, stored as bytes) is read at half the bytes and converted in the kernel to float16,
which holds every e4m3 and e5m2 value exactly: each K and V block goes from its TMA stage through registers
into one float16 buffer the tensor cores read, and queries and P meet them in float16 (the 8-bit FP8 wgmma
would need V transposed and queries rounded to 8 bits). On an H100 that made decode attention 20-31% faster,
not 2x (`benchmarks/kv_cache_fp8.py`): like the 16-bit kernel's, its time goes more to each block's serial
chain of work than to its bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.merge_splits import merge_splits
from pallas_kernels.merge_splits import supported as merge_splits_supported
from pallas_kernels.merge_splits import window as merge_window
from pallas_kernels.metadata import AttentionMetadata, AttentionPlan, plan_rows
from pallas_kernels.reference import write_kv

ROWS = 64  # query rows per tile: the M of one Hopper wgmma
_TMA_ROWS = 8  # rows of one swizzled shared-memory tile: TMA moves and wgmma reads whole 8-row tiles
_LOG2E = math.log2(math.e)
_NUM_SMS = 132  # H100 SXM; only sizes the split heuristics
_MAX_SPLITS = 16  # KV splits of one tile at most
# KV blocks a split takes at least: at one sequence of 512 tokens on an H100, 16 splits of 32 tokens took 3.7 us
# more than 4 of 128 (`benchmarks/attention_splits.py`); and 3 keeps 512-576 tokens at 3 splits, on the merge's
# faster path for few splits (`merge_splits.FEW_SPLITS`)
_MIN_SPLIT_BLOCKS = 3
_SMEM_BUDGET = 220 * 1024  # of the 227 KiB a Hopper block may use
# Columns of the tile table that hold, in every row, the step's facts `_Shapes.splits_per_tile` takes
_TILES_COLUMN, _LONGEST_COLUMN = 5, 6
# Lane semantics: registers carry the layouts we give them (wgmma's), no layout inference.
_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """KV tokens per pipeline step, steps in flight, and KV splits per tile (None: chosen each step by
    `splits_per_tile`, from the step's own tiles and longest context, within the `_plan` heuristic's grid). Two stages
    leave room in shared memory for two blocks per SM, so one block's pipeline fill can overlap another's work:
    on an H100 that beat three and four stages at every decode and prefill shape measured
    (`benchmarks/attention_blocks.py`: 8% at 256 decodes of 480 tokens, 31% on a 2048-token prefill)."""

    block_kv: int = 64
    num_stages: int = 2
    num_splits: int | None = None


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Static facts of one call, shared by the kernel and its XLA wrapper."""

    num_kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    page_size: int
    pages_per_seq: int
    num_tiles: int
    num_splits: int  # the grid's split axis: `num_splits * num_tiles` block slots per KV head for the tiles' splits
    block_kv: int
    num_stages: int
    dynamic_splits: bool  # each step picks its tiles' splits (`splits_per_tile`); else every tile takes num_splits
    split_float32: bool = False  # float32 inputs, computed as bfloat16 high and low halves
    cache_format: str | None = None  # the 8-bit float type a byte cache holds, converted to float16 in the kernel
    # P reaches P.V through shared memory: float32's halves, and under the GPU interpreter, whose wgmma takes
    # shared-memory operands only (compiled 16-bit kernels keep P in registers)
    p_in_smem: bool = True

    @property
    def tokens_per_tile(self) -> int:
        return tokens_per_tile(self.group)

    @property
    def cache_8bit(self) -> bool:
        return self.cache_format is not None

    @property
    def output_blocks(self) -> int:
        """Blocks of the kernel's output a KV head: one a (tile, split) block slot, then `merge_window` rows of
        room for the split merge's masked reads past the last."""
        slots = self.num_splits * self.num_tiles
        return slots if self.num_splits == 1 else slots + merge_window(self.max_splits)

    @property
    def max_splits(self) -> int:
        """The most splits a tile can take: what a split merge must read."""
        if not self.dynamic_splits or self.num_splits == 1:
            return self.num_splits
        return min(_MAX_SPLITS, self.num_splits * self.num_tiles)

    def splits_per_tile(self, active, longest):
        """KV splits of each of a step's `active` query tiles, whose longest context is `longest` tokens: a fixed
        `num_splits`, or enough (KV head, tile, split) blocks for one an SM, with no split shorter than
        `_MIN_SPLIT_BLOCKS` KV blocks of the longest context, at most `max_splits`, and all within the grid's block
        slots. The kernel, `merge_splits` and XLA's merge must agree: each calls this. Scalar int32 arithmetic that
        XLA, Mosaic GPU and Triton all lower."""
        if not self.dynamic_splits or self.num_splits == 1:
            return jnp.int32(self.num_splits)
        active = jnp.maximum(active, 1)
        heads = active * self.num_kv_heads
        fill = lax.div(_NUM_SMS + heads - 1, heads)
        blocks = lax.div(longest + self.block_kv - 1, jnp.int32(self.block_kv))
        by_length = lax.div(blocks + _MIN_SPLIT_BLOCKS - 1, jnp.int32(_MIN_SPLIT_BLOCKS))
        room = lax.div(jnp.int32(self.num_splits * self.num_tiles), active)
        return jnp.maximum(jnp.minimum(jnp.minimum(fill, by_length), jnp.minimum(room, self.max_splits)), 1)


def tokens_per_tile(group: int) -> int:
    """Tokens of a query tile: as many as fill 64 rows of `group` heads each while every tile starts 8-row
    aligned (TMA moves whole 8-row tiles into the swizzled shared memory)."""
    step = _TMA_ROWS // math.gcd(group, _TMA_ROWS)
    return ROWS // group // step * step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The kernel's tables for one step's batch, the same for every layer (`plan_step`)."""

    tiles: jax.Array  # [num_tiles, 7] see `_tile_table`
    q_source: jax.Array  # [num_rows] the flat `token * G + g` query row of each grouped row; T * G: zeros
    out_tile: jax.Array  # [T] the tile holding each token's rows
    out_row: jax.Array  # [T, G] the row in that tile of each of the token's G query heads
    # [T, 4] each token's cache page, slot in the page, first grouped query row, and 1 (0 for padding): the table
    # of `norm_rope_write`, which writes the grouped queries and the cache itself
    write_table: jax.Array
    # [T, 5] each token's out_tile, first out_row, 1 (0 for padding), and the step's active tiles and longest
    # context (what `splits_per_tile` takes): `merge_splits`'
    merge_table: jax.Array


def plan_step(md: AttentionMetadata, num_tokens: int, page_size: int, group: int) -> AttentionPlan:
    """The step's `AttentionPlan` with this kernel's tiles: computed once per step, used by every layer."""
    rows = plan_rows(md, num_tokens, page_size)
    return dataclasses.replace(rows, kernel=plan_tiles(md, rows, num_tokens, group, page_size))


def ragged_paged_attention(q, k, v, kv_cache, md: AttentionMetadata, layer=0, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           sizes: BlockSizes | None = None, plan: AttentionPlan | None = None,
                           cache_format: str | None = None):
    """Same contract as `pallas_kernels.reference.ragged_paged_attention`."""
    plan = _tiled(plan, md, q, kv_cache)
    kv_cache = write_kv(k, v, kv_cache, md, layer, plan, cache_format)
    out = attend(q, kv_cache, md, layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                 sizes=sizes or BlockSizes(), plan=plan, cache_format=cache_format)
    return out, kv_cache


def _tiled(plan: AttentionPlan | None, md: AttentionMetadata, q: jax.Array, kv_cache: jax.Array) -> AttentionPlan:
    """`plan` when it carries this kernel's tiles, else the plan of this call's batch (a standalone call)."""
    if plan is not None and plan.kernel is not None:
        return plan
    return plan_step(md, q.shape[0], kv_cache.shape[2], q.shape[1] // (kv_cache.shape[3] // 2))


def attend(q, kv_cache, md: AttentionMetadata, layer, *, sm_scale: float, sliding_window: int | None,
           soft_cap: float | None, sizes: BlockSizes, plan: AttentionPlan | None = None,
           cache_format: str | None = None) -> jax.Array:
    """Attention of `q [T, H, D]` over the cache: query regrouping in XLA (by the plan's tables), then
    `attend_grouped`: the kernel, the split merge and the row gather back to `[T, H, D]`."""
    plan = _tiled(plan, md, q, kv_cache)
    shapes = _plan(q.shape, kv_cache, md, sizes, cache_format)
    return attend_grouped(_group_rows(q, plan.kernel.q_source, shapes), q.shape, kv_cache, md, layer,
                          sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, sizes=sizes, plan=plan,
                          cache_format=cache_format)


def attend_grouped(q_rows, q_shape: tuple[int, ...], kv_cache, md: AttentionMetadata, layer, *, sm_scale: float,
                   sliding_window: int | None, soft_cap: float | None, sizes: BlockSizes, plan: AttentionPlan,
                   cache_format: str | None = None) -> jax.Array:
    """`attend` of queries already in the kernel's grouped layout `[KVH, rows, D]` (`plan.kernel.q_source`'s rows;
    `norm_rope_write` writes them), as `[T, H, D]` (`q_shape`)."""
    _check_inputs(q_rows, kv_cache, cache_format)
    shapes = _plan(q_shape, kv_cache, md, sizes, cache_format)
    q_parts = _split_halves(q_rows) if shapes.split_float32 else (q_rows.astype(_mma_dtype(shapes, kv_cache.dtype)),)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    out, lse = _call_kernel(plan.kernel.tiles, layer, md.page_indices, q_parts, kv_cache, shapes,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    return _gather_rows(out, lse, plan, q_shape, shapes, q_rows.dtype)


def _plan(q_shape: tuple[int, ...], kv_cache: jax.Array, md: AttentionMetadata, sizes: BlockSizes,
          cache_format: str | None) -> _Shapes:
    num_tokens, num_heads, head_dim = q_shape
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3] // 2
    group = num_heads // num_kv_heads
    if tokens_per_tile(group) == 0:
        raise NotImplementedError(f"pallas_gpu: {group} query heads per KV head do not fit 8-row aligned tiles of "
                                  f"{ROWS} rows (odd groups above 8); use the reference backend")
    num_tiles = _num_tiles(num_tokens, group, md.max_num_seqs)
    block_kv = sizes.block_kv
    max_blocks = -(-md.pages_per_seq * page_size // block_kv)  # a split of its own for each KV block at most
    num_splits = sizes.num_splits or max(1, min(16, max_blocks,
                                                 -(-2 * _NUM_SMS // (num_kv_heads * md.max_num_seqs))))
    if block_kv % ROWS or max(page_size, block_kv) % min(page_size, block_kv):
        raise ValueError(f"pallas_gpu: block_kv {block_kv} must be a multiple of {ROWS} and divide or be divided "
                         f"by the page size {page_size}")
    split_float32 = jnp.dtype(kv_cache.dtype) == jnp.float32
    if split_float32:
        block_kv = ROWS  # the output tile reuses a float32 KV stage
    p_in_smem = split_float32 or jax.default_backend() != "gpu"
    shapes = _Shapes(num_kv_heads, group, head_dim, page_size, md.pages_per_seq, num_tiles, num_splits,
                     block_kv, sizes.num_stages, sizes.num_splits is None, split_float32, cache_format, p_in_smem)
    return _fit_shared_memory(shapes, kv_cache.dtype)


def _mma_dtype(shapes: _Shapes, cache_dtype):
    """What the tensor cores read: float32's bfloat16 halves, float16 for an 8-bit cache, else the cache's own."""
    if shapes.split_float32:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float16) if shapes.cache_8bit else jnp.dtype(cache_dtype)


def _smem_bytes(shapes: _Shapes, dtype) -> int:
    """Shared memory of one block: the query tile(s), K and V stages, the row LSEs, P where it goes through
    shared memory, and for float32 or an 8-bit cache one 16-bit K or V block (`_Buffers.half`)."""
    item, halves = jnp.dtype(dtype).itemsize, 2 if shapes.split_float32 else 1
    size = halves * ROWS * shapes.head_dim * 2 + 2 * shapes.num_stages * shapes.block_kv * shapes.head_dim * item
    size += ROWS * 4 + (ROWS * shapes.block_kv * 2 if shapes.p_in_smem else 0)
    converted = shapes.split_float32 or shapes.cache_8bit
    return size + (shapes.block_kv * shapes.head_dim * 2 if converted else 0)


def _fit_shared_memory(shapes: _Shapes, dtype) -> _Shapes:
    """Fewer stages (down to 2) until a block fits Hopper's shared memory."""
    while _smem_bytes(shapes, dtype) > _SMEM_BUDGET and shapes.num_stages > 2:
        shapes = dataclasses.replace(shapes, num_stages=shapes.num_stages - 1)
    if _smem_bytes(shapes, dtype) > _SMEM_BUDGET:
        raise NotImplementedError(f"pallas_gpu: head dim {shapes.head_dim} does not fit in shared memory")
    return shapes


def _check_inputs(q: jax.Array, kv_cache: jax.Array, cache_format: str | None) -> None:
    dtypes = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
    cache_8bit = kv_cache.dtype == jnp.uint8 and cache_format in ("float8_e4m3fn", "float8_e5m2")
    if jnp.dtype(q.dtype) not in dtypes or not (q.dtype == kv_cache.dtype and cache_format is None or cache_8bit):
        raise NotImplementedError(f"pallas_gpu needs bfloat16, float16 or float32 queries and a cache of their "
                                  f"dtype or of float8_e4m3fn / float8_e5m2 bytes, got {q.dtype} and "
                                  f"{kv_cache.dtype} (cache_format {cache_format})")
    if q.shape[-1] % 64:
        raise NotImplementedError(f"pallas_gpu needs a head dim that is a multiple of 64, got {q.shape[-1]}")


def _num_tiles(num_tokens: int, group: int, max_num_seqs: int) -> int:
    """Tile slots of a step: each sequence's last tile may be partly empty."""
    return min(num_tokens, -(-num_tokens // tokens_per_tile(group)) + max_num_seqs)


def _num_grouped_rows(num_tokens: int, group: int, max_num_seqs: int) -> int:
    """Rows of the grouped query layout: every sequence padded to 8 rows, plus a tile of slack so that a
    64-row tile starting at any sequence's base stays in bounds."""
    return -(-(num_tokens * group + _TMA_ROWS * max_num_seqs) // _TMA_ROWS) * _TMA_ROWS + ROWS


def plan_tiles(md: AttentionMetadata, rows: AttentionPlan, num_tokens: int, group: int, page_size: int) -> TilePlan:
    """The tile table, where each grouped query row comes from, where each token's output rows are, and each
    token's cache slot and first grouped row."""
    num_tiles = _num_tiles(num_tokens, group, md.max_num_seqs)
    num_rows = _num_grouped_rows(num_tokens, group, md.max_num_seqs)
    heads = jnp.arange(group)[None, :]
    t_in_seq = jnp.arange(num_tokens) - md.cu_q_lens[rows.seq]
    first = _row_bases(md, group)[rows.seq] + t_in_seq * group
    dest = jnp.where(rows.valid[:, None], first[:, None] + heads, num_rows)  # [T, G]; padding: dropped
    flat = jnp.arange(num_tokens * group, dtype=jnp.int32).reshape(num_tokens, group)
    q_source = jnp.full(num_rows, num_tokens * group, jnp.int32).at[dest].set(flat, mode="drop")
    per_seq = _tiles_per_seq(md, group)
    first_tile = jnp.cumsum(per_seq) - per_seq
    out_tile = jnp.minimum(first_tile[rows.seq] + t_in_seq // tokens_per_tile(group), num_tiles - 1)
    out_row = (t_in_seq % tokens_per_tile(group))[:, None] * group + heads
    write_table = jnp.stack([rows.page, rows.pos % page_size, first, rows.valid], axis=1).astype(jnp.int32)
    tiles = _tile_table(md, group, num_tiles)
    facts = jnp.broadcast_to(tiles[0, _TILES_COLUMN:], (num_tokens, 2))
    merge_table = jnp.concatenate([jnp.stack([out_tile, out_row[:, 0], rows.valid], axis=1), facts], axis=1)
    return TilePlan(tiles, q_source, out_tile.astype(jnp.int32), out_row.astype(jnp.int32), write_table,
                    merge_table.astype(jnp.int32))


def _row_bases(md: AttentionMetadata, group: int) -> jax.Array:
    """First query row of each sequence in the grouped layout: every sequence starts on a multiple of 8
    rows, because TMA moves 8-row tiles into the swizzled shared memory wgmma reads (an unaligned start
    would leave part of each tile empty)."""
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
    real = jnp.arange(md.max_num_seqs) < md.num_seqs[0]
    sizes = jnp.where(real, -(-q_lens * group // _TMA_ROWS) * _TMA_ROWS, 0)
    return jnp.cumsum(sizes) - sizes


def _tiles_per_seq(md: AttentionMetadata, group: int) -> jax.Array:
    """Query tiles of each sequence (none for padding sequences)."""
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
    return jnp.where(jnp.arange(md.max_num_seqs) < md.num_seqs[0], -(-q_lens // tokens_per_tile(group)), 0)


def _tile_table(md: AttentionMetadata, group: int, num_tiles: int) -> jax.Array:
    """Per tile slot `[num_tiles, 7]`: sequence, first grouped query row, token offset in the sequence,
    the sequence's q_len and kv_len, and in every row the step's number of tiles and its longest context
    (`_TILES_COLUMN`, `_LONGEST_COLUMN`: what `_Shapes.splits_per_tile` takes). Tiles fill the first slots."""
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
    per_seq = _tiles_per_seq(md, group)
    ends = jnp.cumsum(per_seq)
    slot = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), md.max_num_seqs - 1).astype(jnp.int32)
    offset = (slot - (ends[seq] - per_seq[seq])) * tokens_per_tile(group)
    first_row = _row_bases(md, group)[seq] + offset * group
    real = jnp.arange(md.max_num_seqs) < md.num_seqs[0]
    longest = jnp.max(jnp.where(real, md.kv_lens, 0))
    facts = [jnp.broadcast_to(ends[-1], slot.shape), jnp.broadcast_to(longest, slot.shape)]
    return jnp.stack([seq, first_row, offset, q_lens[seq], md.kv_lens[seq], *facts], axis=1).astype(jnp.int32)


def _group_rows(q: jax.Array, q_source: jax.Array, shapes: _Shapes) -> jax.Array:
    """`[T, H, D]` -> `[KVH, rows, D]`: each KV head's query rows, sequence by sequence from 8-aligned
    bases, token-major within a sequence (row = base + token * G + g), gathered by the plan's `q_source`
    (one gather, where a scatter into zeros would take two kernels)."""
    num_tokens = q.shape[0]
    grouped = q.reshape(num_tokens, shapes.num_kv_heads, shapes.group, shapes.head_dim).transpose(1, 0, 2, 3)
    grouped = grouped.reshape(shapes.num_kv_heads, num_tokens * shapes.group, shapes.head_dim)
    grouped = jnp.pad(grouped, ((0, 0), (0, 1), (0, 0)))  # the zero row that padding rows take
    return grouped[:, q_source]


def _split_halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 -> bfloat16 (hi, lo) with x ~= hi + lo to about 16 mantissa bits. `hi` keeps the top 16 bits
    by masking, so it converts to bfloat16 exactly. (Taking lo = x - f32(bf16(x)) instead gave bfloat16-level
    errors, 7e-4, on the H100 while the interpreter gave 5e-6: the round trip did not survive compilation.)"""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
    return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


def _gather_rows(out: jax.Array, lse: jax.Array | None, plan: AttentionPlan, q_shape, shapes: _Shapes, dtype):
    """Pick each query row out of its tile (merging the KV splits by log-sum-exp) back into `[T, H, D]` in `dtype`;
    padding rows are zero, as in the reference. KV splits of 16-bit outputs are merged by one kernel
    (`merge_splits`), not XLA's two. Tile t's n splits are the output's blocks t * n onwards (`_kernel`)."""
    if lse is not None and not shapes.split_float32 and merge_splits_supported(shapes.head_dim):
        return merge_splits(out, lse, plan.kernel.merge_table, shapes.group, dtype, shapes.splits_per_tile,
                            shapes.max_splits)
    tile, row = plan.kernel.out_tile, plan.kernel.out_row
    heads = jnp.arange(shapes.num_kv_heads)[None, None, :, None]
    splits = shapes.splits_per_tile(plan.kernel.tiles[0, _TILES_COLUMN], plan.kernel.tiles[0, _LONGEST_COLUMN])
    pieces = jnp.arange(shapes.max_splits)[:, None]
    used = pieces < splits  # [S, 1]: the split exists for every tile
    block = (tile[None, :] * splits + jnp.where(used, pieces, 0))[:, :, None, None]  # [S, T, 1, 1]
    picked = out[heads, block, row[None, :, None, :]]  # [S, T, KVH, G, D]
    if lse is None:
        merged = picked[0].astype(jnp.float32)
    else:
        weights = jnp.where(used[:, :, None, None], lse[heads, block, row[None, :, None, :]], -jnp.inf)
        top = jnp.max(weights, axis=0)  # [T, KVH, G], log2 units
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w = jnp.exp2(weights - top)
        merged = jnp.sum(w[..., None] * picked, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[..., None]
    merged = jnp.where(plan.valid[:, None, None, None], merged, 0.0)
    return merged.reshape(q_shape).astype(dtype)


def _call_kernel(tiles, layer, page_indices, q_parts, kv_cache, shapes: _Shapes, **attn):
    """The kernel's output tiles (float32 for float32 inputs, else what the tensor cores read) and, with KV
    splits, their rows' log-sum-exps."""
    split = shapes.num_splits > 1
    out_dtype = kv_cache.dtype if shapes.split_float32 else _mma_dtype(shapes, kv_cache.dtype)
    blocks = (shapes.num_kv_heads, shapes.output_blocks, ROWS)
    out_type = [jax.ShapeDtypeStruct((*blocks, shapes.head_dim), out_dtype)]
    if split:
        out_type.append(jax.ShapeDtypeStruct(blocks, jnp.float32))
    body = functools.partial(_kernel, shapes=shapes, num_q=len(q_parts), **attn)
    with _interpret_off_gpu():
        results = plgpu.kernel(
            body, out_type=tuple(out_type), scratch_types=_scratch(shapes, kv_cache.dtype, split),
            grid=(shapes.num_kv_heads, shapes.num_tiles, shapes.num_splits),
            grid_names=("kv_heads", "tiles", "splits"), compiler_params=_COMPILER_PARAMS,
        )(tiles, layer, page_indices, *q_parts, kv_cache)
    return results[0], (results[1] if split else None)


def _scratch(shapes: _Shapes, dtype, split: bool) -> list:
    """Query tile(s), K and V stages as the cache (`dtype`) stores them, P (`p_in_smem`), the 16-bit K or V
    block of float32 and 8-bit caches (`_Buffers.half`), row LSEs, barriers."""
    mma_dtype = _mma_dtype(shapes, dtype)
    d, bk = shapes.head_dim, shapes.block_kv
    kv_tile = (shapes.num_stages, bk, d)
    num_q = 2 if shapes.split_float32 else 1
    converted = shapes.split_float32 or shapes.cache_8bit
    return [
        [plgpu.SMEM((ROWS, d), mma_dtype, transforms=_transforms(mma_dtype, d)) for _ in range(num_q)],
        plgpu.SMEM(kv_tile, dtype, transforms=_transforms(dtype, d)),
        plgpu.SMEM(kv_tile, dtype, transforms=_transforms(dtype, d)),
        plgpu.SMEM((ROWS, bk), mma_dtype, transforms=_transforms(mma_dtype, bk)) if shapes.p_in_smem else None,
        plgpu.SMEM((bk, d), mma_dtype, transforms=_transforms(mma_dtype, d)) if converted else None,
        plgpu.SMEM((ROWS,), jnp.float32) if split else None,
        plgpu.Barrier(num_arrivals=num_q),
        plgpu.Barrier(num_arrivals=2 * max(1, bk // shapes.page_size), num_barriers=shapes.num_stages),
    ]


def _interpret_off_gpu():
    """Mosaic GPU compiles only for NVIDIA GPUs; everywhere else JAX's GPU interpreter runs the kernel."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    return plgpu.force_gpu_interpret_mode()


def _transforms(dtype, minor: int) -> tuple:
    """Shared-memory tiles of 8 rows of up to 128 bytes, swizzled, as wgmma reads them."""
    swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
    return plgpu.TilingTransform((_TMA_ROWS, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


@dataclasses.dataclass(frozen=True)
class _Buffers:
    """One block's shared memory (refs)."""

    q: list  # [q] for 16-bit inputs; [q_hi, q_lo] for float32
    k: object  # [stages, block_kv, D] as the cache stores it
    v: object
    p: object | None  # [64, block_kv] 16-bit probabilities (or float32's halves) where `p_in_smem`
    # [block_kv, D]: float32's bfloat16 half of K or V, or an 8-bit cache's K or V in float16, one at a time;
    # None for 16-bit caches, which the tensor cores read in their stages
    half: object | None
    lse: object | None
    cache_format: str | None = None  # an 8-bit cache's float type (its stages hold bytes)

    @property
    def float32(self) -> bool:
        return len(self.q) == 2

    @property
    def out(self):
        """The output tile: the query tile, or for float32 a KV stage (all consumed by then)."""
        return self.k.at[0] if self.float32 else self.q[0]


def _kernel(tiles_ref, layer_ref, pages_ref, *refs, shapes: _Shapes, num_q: int, sm_scale: float,
            sliding_window: int | None, soft_cap: float | None):
    q_refs, kv_ref, refs = refs[:num_q], refs[num_q], refs[num_q + 1:]
    split = shapes.num_splits > 1
    out_ref, lse_ref = (refs[0], refs[1]) if split else (refs[0], None)
    q_smem, k_smem, v_smem, p_smem, half_smem, lse_smem, q_barrier, kv_barriers = refs[2 if split else 1:]
    buf = _Buffers(q_smem, k_smem, v_smem, p_smem, half_smem, lse_smem, shapes.cache_format)
    head, slot, part = lax.axis_index("kv_heads"), lax.axis_index("tiles"), lax.axis_index("splits")
    # The grid's (split, tile) block slots, in order, hold each tile's splits in turn: tile t's are slots
    # t * splits to t * splits + splits - 1, and write the output's blocks of those numbers (what the merge reads);
    # slots past the step's tiles' splits do nothing.
    active = tiles_ref[0, _TILES_COLUMN]
    splits = shapes.splits_per_tile(active, tiles_ref[0, _LONGEST_COLUMN])
    work = part * shapes.num_tiles + slot
    tile, piece = lax.div(work, splits), lax.rem(work, splits)

    @pl.when(tile < active)
    def _tile():
        seq, first_row, offset, q_len, kv_len = (tiles_ref[tile, i] for i in range(5))
        first_pos = kv_len - q_len + offset  # position of the tile's first query token
        last_pos = kv_len - q_len + jnp.minimum(offset + shapes.tokens_per_tile, q_len) - 1
        lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0) // shapes.block_kv
        hi = (last_pos + shapes.block_kv) // shapes.block_kv
        per_part = lax.div(hi - lo + splits - 1, splits)
        start = lo + piece * per_part
        steps = jnp.maximum(jnp.minimum(start + per_part, hi) - start, 0)
        fetch = functools.partial(_fetch, pages_ref, kv_ref, k_smem, v_smem, kv_barriers, shapes,
                                  layer_ref[0], seq, head, start)
        for j in range(shapes.num_stages):
            pl.when(j < steps)(functools.partial(fetch, j))
        rows = (jnp.minimum(offset + shapes.tokens_per_tile, q_len) - offset) * shapes.group
        moved = functools.partial(_by_rows, rows, shapes)

        def load_q(n: int) -> None:
            for q_ref, smem in zip(q_refs, q_smem):
                plgpu.copy_gmem_to_smem(q_ref.at[head, pl.ds(first_row, n)], smem.at[pl.ds(0, n)], q_barrier)

        moved(load_q)
        plgpu.barrier_wait(q_barrier)
        acc, m_i, l_i = _attend_steps(buf, kv_barriers, fetch, shapes, steps, start, first_pos,
                                      sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
        buf.out[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(buf.out.dtype)
        if split:
            lse_smem[...] = m_i + jnp.log2(l_safe)
        plgpu.commit_smem()
        moved(lambda n: plgpu.copy_smem_to_gmem(buf.out.at[pl.ds(0, n)], out_ref.at[head, work, pl.ds(0, n)]))
        if split:
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[head, work])
        plgpu.wait_smem_to_gmem(0)


def _by_rows(rows, shapes: _Shapes, move) -> None:
    """`move(n)` the first n rows of a tile's queries or output: one 8-row TMA tile when the tile holds no more
    rows (a decode token's heads), else all 64. The rows past a tile's own are never read back, so a decode
    tile moves an eighth of the bytes."""
    if shapes.group > _TMA_ROWS:
        move(ROWS)
        return
    pl.when(rows <= _TMA_ROWS)(lambda: move(_TMA_ROWS))
    pl.when(rows > _TMA_ROWS)(lambda: move(ROWS))


def _fetch(pages_ref, kv_ref, k_smem, v_smem, barriers, shapes: _Shapes, layer, seq, head, start, step):
    """Start the TMA copies of KV block `start + step` of sequence `seq` into stage `step % num_stages`."""
    stage = lax.rem(step, shapes.num_stages)
    first_token = (start + step) * shapes.block_kv
    barrier = barriers.at[stage]
    if shapes.page_size >= shapes.block_kv:
        page = pages_ref[seq, jnp.minimum(first_token // shapes.page_size, shapes.pages_per_seq - 1)]
        rows = pl.ds(first_token % shapes.page_size, shapes.block_kv)
        plgpu.copy_gmem_to_smem(kv_ref.at[layer, page, rows, 2 * head], k_smem.at[stage], barrier)
        plgpu.copy_gmem_to_smem(kv_ref.at[layer, page, rows, 2 * head + 1], v_smem.at[stage], barrier)
        return
    first_page = first_token // shapes.page_size
    for p in range(shapes.block_kv // shapes.page_size):
        page = pages_ref[seq, jnp.minimum(first_page + p, shapes.pages_per_seq - 1)]
        rows = pl.ds(p * shapes.page_size, shapes.page_size)
        plgpu.copy_gmem_to_smem(kv_ref.at[layer, page, :, 2 * head], k_smem.at[stage, rows], barrier)
        plgpu.copy_gmem_to_smem(kv_ref.at[layer, page, :, 2 * head + 1], v_smem.at[stage, rows], barrier)


def _attend_steps(buf: _Buffers, barriers, fetch, shapes: _Shapes, steps, start, first_pos, *,
                  sm_scale: float, sliding_window: int | None, soft_cap: float | None):
    """The online-softmax loop over this block's KV steps; returns (acc, row max, row sum), log2 units."""
    wgmma = plgpu.Layout.WGMMA
    block = (ROWS, shapes.block_kv)
    q_pos = first_pos + plgpu.broadcasted_iota(jnp.int32, block, 0, layout=wgmma) // shapes.group
    column = plgpu.broadcasted_iota(jnp.int32, block, 1, layout=wgmma)

    def step(j, carry):
        acc, m_i, l_i = carry
        stage = lax.rem(j, shapes.num_stages)
        plgpu.barrier_wait(barriers.at[stage])
        s = pl.run_scoped(functools.partial(_scores, buf, stage), plgpu.ACC(block, jnp.float32))
        if soft_cap is None:
            s = s * (sm_scale * _LOG2E)
        else:
            s = jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * _LOG2E)
        kv_pos = (start + j) * shapes.block_kv + column
        allowed = kv_pos <= q_pos
        if sliding_window is not None:
            allowed = allowed & (kv_pos > q_pos - sliding_window)
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, block, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        pv = pl.run_scoped(functools.partial(_values, buf, stage, p), plgpu.ACC(acc.shape, jnp.float32))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
        pl.when(j + shapes.num_stages < steps)(lambda: fetch(j + shapes.num_stages))
        return acc, m_new, l_i

    init = (plgpu.layout_cast(jnp.zeros((ROWS, shapes.head_dim), jnp.float32), wgmma),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma.reduce(1)))
    return lax.fori_loop(0, steps, step, init)


def _scores(buf: _Buffers, stage, acc_ref):
    """Q.K^T of one KV step into `acc_ref`; float32 as q_hi.k_hi + q_lo.k_hi + q_hi.k_lo; an 8-bit cache's K
    converted to float16 first."""
    if not buf.float32:
        key = buf.k.at[stage] if buf.half is None else _converted(buf.half, buf.k.at[stage], buf.cache_format)
        plgpu.wgmma(acc_ref, buf.q[0], key.transpose((1, 0)))
        return acc_ref[...]
    q_hi, q_lo = buf.q
    k_hi, k_lo = _split_halves(buf.k.at[stage][...])
    key = buf.half.transpose((1, 0))
    _stage_half(buf.half, k_hi)
    plgpu.wgmma(acc_ref, q_hi, key)
    plgpu.wgmma(acc_ref, q_lo, key)
    plgpu.wgmma_wait(0)  # the tensor cores are done with k_hi
    _stage_half(buf.half, k_lo)
    plgpu.wgmma(acc_ref, q_hi, key)
    return acc_ref[...]


def _values(buf: _Buffers, stage, p, acc_ref):
    """P.V of one KV step into `acc_ref`. 16-bit P goes to the tensor cores from registers, as in
    FlashAttention-3 (no shared-memory round trip); float32 as p_hi.v_hi + p_lo.v_hi + p_hi.v_lo."""
    if not buf.float32:
        value = buf.v.at[stage] if buf.half is None else _converted(buf.half, buf.v.at[stage], buf.cache_format)
        p = p.astype(value.dtype)
        if buf.p is not None:
            _stage_half(buf.p, p)
        plgpu.wgmma(acc_ref, p if buf.p is None else buf.p, value)
        return acc_ref[...]
    p_hi, p_lo = _split_halves(p)
    v_hi, v_lo = _split_halves(buf.v.at[stage][...])
    _stage_half(buf.half, v_hi)
    _stage_half(buf.p, p_hi)
    plgpu.wgmma(acc_ref, buf.p, buf.half)
    plgpu.wgmma_wait(0)
    _stage_half(buf.p, p_lo)
    plgpu.wgmma(acc_ref, buf.p, buf.half)
    plgpu.wgmma_wait(0)
    _stage_half(buf.half, v_lo)
    _stage_half(buf.p, p_hi)
    plgpu.wgmma(acc_ref, buf.p, buf.half)
    return acc_ref[...]


def _converted(half, stage, cache_format: str):
    """A K or V stage of 8-bit float bytes converted into the 16-bit buffer `half` (read 4 bytes a thread at a
    time, the 8-bit wgmma layout; 1% faster than 2) for the tensor cores; returns `half`."""
    stored = plgpu.load(stage, layout=plgpu.Layout.WGMMA_8BIT)
    _stage_half(half, lax.bitcast_convert_type(stored, jnp.dtype(cache_format)).astype(half.dtype))
    return half


def _stage_half(smem, value) -> None:
    """Store registers where the tensor cores read next (the store is fenced for their async proxy)."""
    smem[...] = value
    plgpu.commit_smem()
