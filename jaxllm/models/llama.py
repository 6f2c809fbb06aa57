"""The Llama-family decoder in Flax NNX: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Decoder layers are created once with every parameter stacked on a leading `layers` axis and run in a loop
(`lax.while_loop`, sliced by its counter), so compile time does not grow with depth (unrolled, an 8B model's
step took 55 s to compile on an H100 and XLA copied the KV cache between layers). With `pipeline_stages > 1`
the stack is padded to a multiple of the stages with identity layers and run as a pipeline
(`jaxllm.pipeline`). Attention reads and writes the paged KV cache through
`pallas_kernels.ragged_paged_attention`; one call serves a ragged batch of prefills and decodes, each device
on its own heads under tensor parallelism, with one `plan_attention` per step shared by the layers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import pallas_kernels
from jaxllm.config import ModelConfig
from jaxllm.models.layers import apply_rope, linear, pad_stacked, param, rms_norm, rope_inv_freq, rope_tables
from jaxllm.models.quantization import Fp8Param, Fp8Weight, streams_in_place
from jaxllm.parallel import ShardingRules, padded_layers
from jaxllm.pipeline import run_pipeline
from pallas_kernels.metadata import AttentionMetadata, AttentionPlan
from pallas_kernels.norm_gate_up import norm_gate_up
from pallas_kernels.norm_gate_up import supported as norm_gate_up_supported
from pallas_kernels.norm_rope_write import norm_rope_write
from pallas_kernels.norm_rope_write import supported as norm_rope_write_supported

Rope = tuple[jax.Array, jax.Array]
FUSED_NORM_ROPE_ROWS = 256  # the largest step `norm_rope_write` serves (`LlamaForCausalLM._fuses_norm_rope`)


@dataclasses.dataclass(frozen=True)
class LayerKernels:
    """How a step's decoder layers run, fixed when the step is traced (`LlamaForCausalLM._layer_kernels`)."""

    backend: str  # the attention backend
    block_sizes: tuple | None = None  # the attention kernel's, as `(field, value)` pairs
    cache_format: str | None = None  # the 8-bit float type of a cache stored as bytes
    stream_fp8: bool = False  # FP8 weights enter the loop whole, read at the layer (`_streams_fp8`)
    fuse_norm_gate_up: bool = False  # `MLP.with_norm` (`_fuses_norm_gate_up`)
    fuse_norm_rope: bool = False  # `Attention._fused_norm_rope` (`_fuses_norm_rope`)


class Attention(nnx.Module):
    """Grouped-query self-attention over the paged cache. Q, K and V are one parameter grouped by KV head
    (`qkv_proj [embed, kv_heads, G + 2, head_dim]`: each KV head's G query heads, then its k and v), so that one
    GEMM computes them (at Llama-3.1-8B shape on an H100 that saved about 5 us a layer against a q GEMM and a
    k/v GEMM, `benchmarks/bf16_gemm_layouts.py`), and tensor parallelism splits it by whole KV heads, as it
    splits the cache. (Where the KV heads do not divide over the devices, it is replicated.)"""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        dt, e, h, kvh, d = cfg.jnp_dtype, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        group = h // kvh
        self.qkv_proj = param(rngs, (e, kvh, group + 2, d), ("embed", "kv_heads", None, "head_dim"), dt, stack)
        self.o_proj = param(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), dt, stack)
        if cfg.qkv_bias:
            self.qkv_bias = param(rngs, (kvh, group + 2, d), ("kv_heads", None, "head_dim"), dt, stack, "zeros")
        if cfg.o_bias:
            self.o_bias = param(rngs, (e,), ("embed",), dt, stack, "zeros")
        if cfg.qk_norm:
            self.q_norm = param(rngs, (d,), ("head_dim",), dt, stack, "ones")
            self.k_norm = param(rngs, (d,), ("head_dim",), dt, stack, "ones")
        self.cfg = cfg

    def __call__(self, x: jax.Array, rope: Rope, kv_cache: jax.Array, md: AttentionMetadata, plan: AttentionPlan,
                 layer: jax.Array, kernels: LayerKernels) -> tuple[jax.Array, jax.Array]:
        """Attention of `x`, already normalized unless `kernels.fuse_norm_rope` (then `norm_rope_write` does it)."""
        cfg = self.cfg
        streamed = layer if kernels.stream_fp8 else None
        qkv = linear(x, self.qkv_proj, layer=streamed)
        if kernels.fuse_norm_rope:
            out, kv_cache = self._fused_norm_rope(x, qkv, rope, kv_cache, md, plan, layer, kernels)
        else:
            out, kv_cache = self._attend(qkv, rope, kv_cache, md, plan, layer, kernels)
        out = linear(out, self.o_proj, num_in=2, layer=streamed)
        if cfg.o_bias:
            out = out + self.o_bias[...]
        return out, kv_cache

    def _attend(self, qkv: jax.Array, rope: Rope, kv_cache: jax.Array, md: AttentionMetadata, plan: AttentionPlan,
                layer: jax.Array, kernels: LayerKernels) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        if cfg.qkv_bias:
            qkv = qkv + self.qkv_bias[...]
        group = cfg.num_heads // cfg.num_kv_heads
        q = qkv[:, :, :group].reshape(qkv.shape[0], cfg.num_heads, cfg.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        return pallas_kernels.ragged_paged_attention(
            q, k, v, kv_cache, md, layer, sm_scale=cfg.sm_scale, sliding_window=cfg.sliding_window,
            backend=kernels.backend, heads_axis=ShardingRules().kv_heads, block_sizes=kernels.block_sizes, plan=plan,
            cache_format=kernels.cache_format)

    def _fused_norm_rope(self, x: jax.Array, qkv: jax.Array, rope: Rope, kv_cache: jax.Array, md: AttentionMetadata,
                         plan: AttentionPlan, layer: jax.Array, kernels: LayerKernels) -> tuple[jax.Array, jax.Array]:
        """The input norm as a row scale of `qkv = x @ W`, RoPE, the queries' grouping and the K/V write in one
        kernel (`norm_rope_write`), then the Mosaic GPU attention kernel on its grouped queries."""
        cfg = self.cfg
        tiles = plan.kernel
        q_rows, kv_cache = norm_rope_write(x, qkv, rope, kv_cache, layer, tiles.write_table, tiles.q_source.shape[0],
                                           cfg.rms_norm_eps, kernels.cache_format)
        out = pallas_kernels.attend_grouped(q_rows, (x.shape[0], cfg.num_heads, cfg.head_dim), kv_cache, md, layer,
                                            sm_scale=cfg.sm_scale, sliding_window=cfg.sliding_window,
                                            block_sizes=kernels.block_sizes, plan=plan,
                                            cache_format=kernels.cache_format)
        return out, kv_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, gate and up one parameter (`gate_up_proj [embed,
    2, mlp]`: one GEMM for both)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        dt, e, m = cfg.jnp_dtype, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = param(rngs, (e, 2, m), ("embed", None, "mlp"), dt, stack)
        self.down_proj = param(rngs, (m, e), ("mlp", "embed"), dt, stack)

    def __call__(self, x: jax.Array, streamed: jax.Array | None = None) -> jax.Array:
        gate_up = linear(x, self.gate_up_proj, layer=streamed)
        return linear(jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :], self.down_proj, layer=streamed)

    def with_norm(self, x: jax.Array, layer: jax.Array, eps: float) -> jax.Array:
        """This MLP of `rms_norm(x)`, whose scale is folded into `gate_up_proj`: the norm, gate/up and SiLU in one
        kernel (`pallas_kernels.norm_gate_up`) reading `gate_up_proj`, here the whole layer stack, at `layer`."""
        return linear(norm_gate_up(x, self.gate_up_proj[...], layer, eps), self.down_proj)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks with residuals, run as `LayerKernels` says. With `stream_fp8`, its FP8
    weights are the whole layer stacks, read at `layer` in place (`LlamaForCausalLM._run_stack`); with
    `fuse_norm_gate_up`, so is `gate_up_proj`, for `MLP.with_norm`; with `fuse_norm_rope`, attention takes x
    itself and normalizes it as a row scale after the q/k/v GEMM. Once `fold_norm_scales` has run, the two RMSNorm
    scales live in the rows of the projections that read the norms' outputs."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        dt = cfg.jnp_dtype
        self.input_norm = param(rngs, (cfg.hidden_size,), ("embed",), dt, stack, "ones")
        self.post_attention_norm = param(rngs, (cfg.hidden_size,), ("embed",), dt, stack, "ones")
        self.attn = Attention(cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        self.eps = cfg.rms_norm_eps
        self.norm_scales_folded = False

    def __call__(self, x: jax.Array, rope: Rope, kv_cache: jax.Array, md: AttentionMetadata, plan: AttentionPlan,
                 layer: jax.Array, kernels: LayerKernels) -> tuple[jax.Array, jax.Array]:
        attn_in = x if kernels.fuse_norm_rope else self._norm(x, "input_norm")
        h, kv_cache = self.attn(attn_in, rope, kv_cache, md, plan, layer, kernels)
        x = x + h
        if kernels.fuse_norm_gate_up:
            return x + self.mlp.with_norm(x, layer, self.eps), kv_cache
        x = x + self.mlp(self._norm(x, "post_attention_norm"), layer if kernels.stream_fp8 else None)
        return x, kv_cache

    def _norm(self, x: jax.Array, name: str) -> jax.Array:
        return rms_norm(x, None if self.norm_scales_folded else getattr(self, name)[...], self.eps)

    def fold_norm_scales(self) -> None:
        """Multiply the input norm's scale into the rows of `qkv_proj` and the post-attention norm's into those
        of `gate_up_proj` (`norm(x) * g @ W == norm(x) @ (g[:, None] * W)`), in each weight's dtype, and drop
        the scales. In the layer loop a stacked scale is sliced per layer, and XLA made each slice a copy of its
        own before the norm's kernel: on an H100 at Llama-3.1-8B shape, two copies and a wait each layer, about
        0.15 ms a batch-1 token. Only the rounding of the products changes. A second call does nothing."""
        if self.norm_scales_folded:
            return
        for norm, projection in (("input_norm", self.attn.qkv_proj), ("post_attention_norm", self.mlp.gate_up_proj)):
            projection.set_value(_scale_rows(projection[...], getattr(self, norm)[...]))
            delattr(self, norm)
        self.norm_scales_folded = True


class LlamaForCausalLM(nnx.Module):
    """Token embeddings, a looped stack of decoder layers, final norm and the LM head (tied or not).

    `pipeline_stages` is the size of the mesh's `pipeline` axis the model will run on: the layer stack then
    holds `padded_layers(num_layers, pipeline_stages)` layers, the ones past `num_layers` all zeros.
    `kv_cache_format`: the 8-bit float type of a cache stored as bytes, set by whoever allocates the cache
    (`ModelRunner`); None for a cache of the K/V's own dtype."""

    kv_cache_format: str | None = None

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_backend: str = "auto",
                 pipeline_stages: int = 1, attention_block_sizes: dict[str, int] | None = None):
        dt = cfg.jnp_dtype
        self.cfg = cfg
        self.attention_backend = pallas_kernels.resolve_backend(attention_backend, cfg.jnp_dtype)
        self.attention_block_sizes = tuple(sorted(attention_block_sizes.items())) if attention_block_sizes else None
        self.pipeline_stages = pipeline_stages
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)
        self.layers = DecoderLayer(cfg, rngs, stack=cfg.num_layers)
        if padded_layers(cfg.num_layers, pipeline_stages) != cfg.num_layers:
            pad_stacked(self.layers, padded_layers(cfg.num_layers, pipeline_stages))
        self.norm = param(rngs, (cfg.hidden_size,), ("embed",), dt, init="ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv_cache: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """Hidden states `[T, E]` after the final norm, and the updated KV cache."""
        with jax.default_matmul_precision(_matmul_precision(self.cfg)):
            return self._forward(tokens, positions, kv_cache, md)

    def _forward(self, tokens: jax.Array, positions: jax.Array, kv_cache: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        x = self.embed_tokens[...][tokens]
        graphdef, stacked = nnx.split(self.layers)
        run_stack = functools.partial(self._run_stack, graphdef)
        if self.pipeline_stages == 1:
            x, kv_cache = run_stack(stacked, x, positions, kv_cache, md)
        else:
            x, kv_cache = run_pipeline(run_stack, stacked, x, positions, kv_cache, md, self.pipeline_stages)
        return rms_norm(x, self.norm[...], self.cfg.rms_norm_eps), kv_cache

    def _run_stack(self, graphdef: nnx.GraphDef, stacked: nnx.State, x: jax.Array, positions: jax.Array,
                   kv_cache: jax.Array, md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """The layers of `stacked` in order, each on the cache layer of its index in the stack (under the
        pipeline, a stage's own layers and its own slice of the cache). What the layers share (the rotary
        tables, the attention plan) is computed once, before them."""
        cfg = self.cfg
        rope = rope_tables(positions, jnp.asarray(rope_inv_freq(cfg.rope, cfg.head_dim)))
        plan = pallas_kernels.plan_attention(md, x.shape[0], page_size=kv_cache.shape[2],
                                             group=cfg.num_heads // cfg.num_kv_heads, backend=self.attention_backend)

        kernels = self._layer_kernels(x.shape[0])
        kept_whole = nnx.Any(Fp8Param if kernels.stream_fp8 else nnx.Nothing,
                             nnx.PathContains("gate_up_proj") if kernels.fuse_norm_gate_up else nnx.Nothing)
        whole, sliced = nnx.split_state(stacked, kept_whole, ...)

        def one_layer(carry):
            index, x, kv_cache = carry
            layer_state = jax.tree.map(lambda w: lax.dynamic_index_in_dim(w, index, keepdims=False), sliced)
            layer = nnx.merge(graphdef, whole, layer_state)
            x, kv_cache = layer(x, rope, kv_cache, md, plan, index, kernels)
            return index + 1, x, kv_cache

        # A while loop whose first element is its counter, as `scan` lowers to, with the weights sliced by that
        # counter, so XLA's GEMMs read them in place (slicing by another index made XLA copy every layer's weights
        # first, and so does unrolling the loop: two or four layers an iteration took 16.7-17.0 ms per batch-1
        # token on an H100 against 7.9). The attention kernel takes the counter as its cache layer (a `scan` over
        # `arange(depth)` sliced that array too: one more copy per layer).
        depth = jax.tree.leaves(stacked)[0].shape[0]
        _, x, kv_cache = lax.while_loop(lambda carry: carry[0] < depth, one_layer, (jnp.int32(0), x, kv_cache))
        return x, kv_cache

    def _layer_kernels(self, rows: int) -> LayerKernels:
        return LayerKernels(self.attention_backend, self.attention_block_sizes, self.kv_cache_format,
                            self._streams_fp8(rows), self._fuses_norm_gate_up(rows), self._fuses_norm_rope(rows))

    def _streams_fp8(self, rows: int) -> bool:
        """Whether the FP8 weights go to `fp8_gemm` whole, to be read at the layer in place: with the Mosaic GPU
        kernels (`pallas_gpu`), on one device (under tensor or pipeline parallelism XLA partitions the GEMMs),
        for steps the kernel takes. Otherwise XLA's FP8 GEMMs get each layer's slice, which XLA copies first."""
        weights = [m for _, m in nnx.iter_graph(self.layers) if isinstance(m, Fp8Weight)]
        return (self.attention_backend == "pallas_gpu" and bool(weights) and _on_one_device(weights[0].weight[...])
                and streams_in_place(weights, rows))

    def _fuses_norm_gate_up(self, rows: int) -> bool:
        """Whether the post-attention norm, gate/up and SiLU run as one kernel (`MLP.with_norm`): with the Mosaic GPU
        kernels (`pallas_gpu`, whose loading folds the norm scales), 16-bit weights on one device, and steps of at
        most 16 rows, the kernel's one tile of rows (batch-1 decoding: 0.2 ms less a token on an H100 at
        Llama-3.1-8B shape). Larger steps, where it was not measured, keep XLA's fusions around cuBLAS."""
        weight = self._fusable(self.layers.mlp.gate_up_proj)
        return weight is not None and norm_gate_up_supported(rows, weight.shape, weight.dtype)

    def _fuses_norm_rope(self, rows: int) -> bool:
        """Whether the input norm, RoPE, the queries' grouping and the K/V write run as one kernel
        (`Attention._fused_norm_rope`): with the Mosaic GPU kernels and folded norm scales, 16-bit weights on one
        device (the cache of their dtype or 8-bit), no q/k/v bias or q/k norm, and steps of at most
        `FUSED_NORM_ROPE_ROWS` rows (at 8B shape on an H100: 0.1-0.2 ms less a batch-1 token, 2% less a
        256-sequence step)."""
        cfg, weight = self.cfg, self._fusable(self.layers.attn.qkv_proj)
        if weight is None or cfg.qkv_bias or cfg.qk_norm or rows > FUSED_NORM_ROPE_ROWS:
            return False
        cache_dtype = jnp.uint8 if self.kv_cache_format else weight.dtype
        return norm_rope_write_supported(weight.dtype, cache_dtype, cfg.head_dim, self.kv_cache_format)

    def _fusable(self, projection: nnx.Param | Fp8Weight):
        """The type of a projection weight that a norm-fusing kernel may read, or None: on the Mosaic GPU path with
        the norm scales folded into it (`fold_norm_scales`), not FP8, on one device (under tensor or pipeline
        parallelism XLA partitions the projections around kernels it cannot see into)."""
        if (self.attention_backend != "pallas_gpu" or not self.layers.norm_scales_folded
                or isinstance(projection, Fp8Weight) or not _on_one_device(projection[...])):
            return None
        return jax.typeof(projection[...])

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits `[N, vocab]` for the given hidden rows."""
        head = self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        with jax.default_matmul_precision(_matmul_precision(self.cfg)):
            return jnp.dot(hidden, head, preferred_element_type=jnp.float32)


def _scale_rows(weight: jax.Array, scale: jax.Array) -> jax.Array:
    """`weight [L, E, ...] * scale [L, E]` along E, computed in float32, in the weight's dtype and sharding, in
    the weight's own buffer (donated: an 8B model's gate/up stack alone is 7.5 GB)."""
    def scaled(w, g):
        return (w.astype(jnp.float32) * g.astype(jnp.float32).reshape(g.shape + (1,) * (w.ndim - 2))).astype(w.dtype)
    return jax.jit(scaled, out_shardings=weight.sharding, donate_argnums=0)(weight, scale)


def _on_one_device(array: jax.Array) -> bool:
    """Whether `array` (traced or not) lives on one device: no mesh, or a mesh of one."""
    mesh = jax.typeof(array).sharding.mesh
    return mesh.empty or mesh.size == 1


def _matmul_precision(cfg: ModelConfig) -> str:
    """A float32 model computes in true float32 (GPUs would otherwise use TF32), as PyTorch does by default."""
    return "highest" if cfg.dtype == "float32" else "default"
