"""Ragged paged attention as a Mosaic TPU Pallas kernel (runs in JAX's TPU interpreter everywhere else).

One grid step per sequence (sequential, `arbitrary`), with the batch metadata scalar-prefetched into SMEM.
Within a sequence, query rows go in chunks of `block_q`; for each chunk the KV pages it can see stream
from HBM into VMEM `pages_per_block` pages at a time through two buffers (the DMA of block j+1 runs while
block j is computed), with an online softmax across blocks. New K/V rows are written into their pages
before the kernel (an in-place scatter on the donated cache).

Interpreter-friendly by construction (DESIGN.md): refs are only sliced and copied whole; reshapes and the
K/V de-interleave happen on loaded values, and masking uses `jnp.where`, never masked stores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.metadata import AttentionMetadata, AttentionPlan, plan_rows
from pallas_kernels.reference import cache_values, write_kv

_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query rows per chunk, and KV tokens moved per DMA block (rounded to whole pages)."""

    block_q: int
    block_kv_tokens: int


# Per TPU generation: VMEM grows from v5e to v6e/v5p, so larger KV blocks keep the DMA engine busier.
BLOCK_SIZES = {
    "v5e": BlockSizes(block_q=32, block_kv_tokens=256),
    "v5p": BlockSizes(block_q=64, block_kv_tokens=512),
    "v6e": BlockSizes(block_q=64, block_kv_tokens=512),
    "default": BlockSizes(block_q=16, block_kv_tokens=128),
}


def block_sizes() -> BlockSizes:
    """The table entry for the TPU this runs on (the default off TPU, where the interpreter runs it)."""
    if jax.default_backend() != "tpu":
        return BLOCK_SIZES["default"]
    kind = jax.devices()[0].device_kind.lower()
    for generation in ("v6e", "v5p", "v5e"):
        if generation.replace("e", " lite") in kind or generation in kind:
            return BLOCK_SIZES[generation]
    return BLOCK_SIZES["default"]


def ragged_paged_attention(q, k, v, kv_cache, md: AttentionMetadata, layer=0, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           sizes: BlockSizes | None = None, plan: AttentionPlan | None = None,
                           cache_format: str | None = None):
    """Same contract as `pallas_kernels.reference.ragged_paged_attention`."""
    plan = plan or plan_rows(md, q.shape[0], kv_cache.shape[2])
    kv_cache = write_kv(k, v, kv_cache, md, layer, plan, cache_format)
    out = attend(q, kv_cache, md, layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                 sizes=sizes or block_sizes(), plan=plan, cache_format=cache_format)
    return out, kv_cache


def attend(q, kv_cache, md: AttentionMetadata, layer, *, sm_scale: float, sliding_window: int | None,
           soft_cap: float | None, sizes: BlockSizes, plan: AttentionPlan | None = None,
           cache_format: str | None = None):
    num_tokens, num_heads, head_dim = q.shape
    page_size = kv_cache.shape[2]
    block_q = sizes.block_q
    pages_per_block = max(1, sizes.block_kv_tokens // page_size)
    q_padded = jnp.pad(q, ((0, block_q), (0, 0), (0, 0)))  # a chunk may read past the last row
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, block_q=block_q,
        pages_per_block=pages_per_block, pages_per_seq=md.pages_per_seq, cache_format=cache_format)
    num_kv_heads2 = kv_cache.shape[3]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(md.max_num_seqs,),
        in_specs=[pl.BlockSpec(memory_space=pltpu.MemorySpace.HBM)] * 2,
        out_specs=pl.BlockSpec(memory_space=pltpu.MemorySpace.HBM),
        scratch_shapes=[
            pltpu.VMEM((block_q, num_heads, head_dim), q.dtype),
            pltpu.VMEM((block_q, num_heads, head_dim), q.dtype),
            pltpu.VMEM((2, pages_per_block, page_size, num_kv_heads2, head_dim), kv_cache.dtype),
            pltpu.SemaphoreType.DMA((2, pages_per_block)),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_padded.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if jax.default_backend() != "tpu" else False,
    )(md.cu_q_lens, md.kv_lens, md.page_indices.reshape(-1), md.num_seqs,
      jnp.asarray(layer, jnp.int32).reshape(1), q_padded, kv_cache)
    valid = (plan or plan_rows(md, num_tokens, page_size)).valid
    return jnp.where(valid[:, None, None], out[:num_tokens], 0).astype(q.dtype)


def _kernel(cu_ref, kv_lens_ref, pages_ref, num_seqs_ref, layer_ref, q_hbm, kv_hbm, out_hbm,
            q_buf, o_buf, kv_buf, kv_sems, io_sems, *, sm_scale, sliding_window, soft_cap, block_q,
            pages_per_block, pages_per_seq, cache_format):
    seq = pl.program_id(0)

    @pl.when(seq < num_seqs_ref[0])
    def _():
        q_start, q_len = cu_ref[seq], cu_ref[seq + 1] - cu_ref[seq]
        kv_len = kv_lens_ref[seq]
        layer = layer_ref[0]
        page_size = kv_buf.shape[2]
        block_tokens = pages_per_block * page_size

        def page_copy(block, slot, i):
            index = jnp.minimum(block * pages_per_block + i, pages_per_seq - 1)
            page = pages_ref[seq * pages_per_seq + index]
            return pltpu.make_async_copy(kv_hbm.at[layer, page], kv_buf.at[slot, i], kv_sems.at[slot, i])

        def start_block(block, slot):
            for i in range(pages_per_block):
                page_copy(block, slot, i).start()

        def wait_block(block, slot):
            for i in range(pages_per_block):
                page_copy(block, slot, i).wait()

        def q_chunk(c, carry):
            row0 = q_start + c * block_q
            load = pltpu.make_async_copy(q_hbm.at[pl.ds(row0, block_q)], q_buf, io_sems.at[0])
            load.start()
            load.wait()
            q = q_buf[...].astype(jnp.float32) * sm_scale
            num_heads, head_dim = q.shape[1], q.shape[2]
            num_kv_heads = kv_buf.shape[3] // 2
            group = num_heads // num_kv_heads
            qg = q.reshape(block_q, num_kv_heads, group, head_dim)
            rows = c * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
            q_pos = kv_len - q_len + rows  # [block_q, 1]
            row_ok = rows < q_len
            last_visible = kv_len - q_len + jnp.minimum((c + 1) * block_q, q_len)  # tokens this chunk may see
            num_blocks = (last_visible + block_tokens - 1) // block_tokens
            start_block(0, 0)

            def kv_block(j, state):
                m, denom, acc = state
                slot = j % 2
                wait_block(j, slot)

                @pl.when(j + 1 < num_blocks)
                def _():
                    start_block(j + 1, 1 - slot)

                kv = cache_values(kv_buf[slot], cache_format).astype(jnp.float32)
                kv = kv.reshape(block_tokens, num_kv_heads, 2, head_dim)
                keys, values = kv[:, :, 0, :], kv[:, :, 1, :]
                s = jnp.einsum("qkgd,tkd->qkgt", qg, keys)
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                kv_pos = j * block_tokens + jax.lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
                allowed = (kv_pos <= q_pos) & row_ok
                if sliding_window is not None:
                    allowed &= kv_pos > q_pos - sliding_window
                allowed = allowed[:, None, None, :]
                s = jnp.where(allowed, s, _MASKED)
                m_new = jnp.maximum(m, s.max(axis=-1))
                p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
                scale = jnp.exp(m - m_new)
                denom = denom * scale + p.sum(axis=-1)
                acc = acc * scale[..., None] + jnp.einsum("qkgt,tkd->qkgd", p, values)
                return m_new, denom, acc

            init = (jnp.full((block_q, num_kv_heads, group), _MASKED, jnp.float32),
                    jnp.zeros((block_q, num_kv_heads, group), jnp.float32),
                    jnp.zeros((block_q, num_kv_heads, group, head_dim), jnp.float32))
            _, denom, acc = jax.lax.fori_loop(0, num_blocks, kv_block, init)
            out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
            o_buf[...] = out.reshape(block_q, num_heads, head_dim).astype(o_buf.dtype)
            store = pltpu.make_async_copy(o_buf, out_hbm.at[pl.ds(row0, block_q)], io_sems.at[1])
            store.start()
            store.wait()
            return carry

        jax.lax.fori_loop(0, (q_len + block_q - 1) // block_q, q_chunk, 0)
