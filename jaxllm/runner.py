"""The model runner: packs a scheduled step into bucketed device arrays and runs the one compiled step.

The step (forward pass and sampling) is a single jitted function with the KV cache donated. Its shapes
come from a fixed set of buckets (padded token count; the sequence count follows it), all compiled at
start-up, so serving never compiles. Prompt logprobs need logits for every row; that variant is compiled
the first time a request asks for them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxllm.engine_config import EngineConfig
from jaxllm.parallel import ShardingRules, kv_cache_sharding, padded_layers
from jaxllm.request import Request
from jaxllm.sampling import SampleResult, SamplingInputs, sample
from jaxllm.scheduler import SchedulerOutput
from pallas_kernels import AttentionMetadata, kv_cache_shape

logger = logging.getLogger(__name__)

MAX_BANNED = 64  # token ids a row may ban at once (EOS and stop_token_ids under min_tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Everything one step needs, padded to a bucket."""

    tokens: jax.Array  # [T]
    positions: jax.Array  # [T]
    md: AttentionMetadata
    logits_indices: jax.Array  # [S] the row whose logits each sequence samples from
    next_tokens: jax.Array  # [T] the token following each row (prompt logprobs), -1 if none
    sampling: SamplingInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    token_logprobs: jax.Array  # [T] logprob of next_tokens
    ranks: jax.Array  # [T]
    top_ids: jax.Array  # [T, N]
    top_logprobs: jax.Array  # [T, N]


def _logprobs_of(logits: jax.Array, targets: jax.Array, num: int):
    raw = jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(raw, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(raw > target_lp[:, None], axis=-1).astype(jnp.int32)
    top_lp, top_ids = jax.lax.top_k(raw, num)
    return target_lp, ranks, top_ids.astype(jnp.int32), top_lp


class ModelRunner:
    """Holds the parameters and the KV cache on the device and runs steps."""

    def __init__(self, config: EngineConfig, model: nnx.Module, mesh: jax.sharding.Mesh,
                 rules: ShardingRules = ShardingRules()):
        self.config = config
        self.model_config = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.max_model_len = config.max_model_len
        self.pages_per_seq = -(-config.max_model_len // config.block_size)
        self.num_logprobs = max(config.max_logprobs, 1)
        self.mesh, self.rules = mesh, rules
        self.kv_cache: jax.Array | None = None
        self.cache_sharding = self._cache_sharding(1)
        self._step = jax.jit(self._forward, donate_argnums=(1,), static_argnames=("with_prompt_logprobs",),
                             out_shardings=(None, None, self.cache_sharding))

    def _cache_shape(self, num_pages: int) -> tuple:
        cfg = self.model_config
        layers = padded_layers(cfg.num_layers, self.mesh.shape["pipeline"])  # pipeline stages' identity layers
        return kv_cache_shape(layers, num_pages, self.config.block_size, cfg.num_kv_heads, cfg.head_dim)

    def _cache_sharding(self, num_pages: int) -> jax.sharding.NamedSharding:
        return kv_cache_sharding(self._cache_shape(num_pages), self.mesh, self.rules)

    def allocate_kv_cache(self, num_pages: int) -> None:
        shape, dtype = self._cache_shape(num_pages), self.model_config.jnp_dtype
        self.kv_cache = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding)()

    def workspace_bytes(self) -> int:
        """Device memory a step needs besides the parameters and the cache, as XLA counts it for the largest
        bucket (vLLM profiles a dummy run for the same reason)."""
        bucket = self.config.token_buckets()[-1]
        probe = jax.ShapeDtypeStruct(self._cache_shape(self.pages_per_seq), self.model_config.jnp_dtype,
                                     sharding=self.cache_sharding)
        compiled = self._step.lower(self.params, probe, self._empty_batch(bucket),
                                    with_prompt_logprobs=False).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def _forward(self, params, kv_cache, batch: StepBatch, with_prompt_logprobs: bool):
        model = nnx.merge(self.graphdef, params)
        hidden, kv_cache = model(batch.tokens, batch.positions, kv_cache, batch.md)
        result = sample(model.compute_logits(hidden[batch.logits_indices]), batch.sampling, self.num_logprobs)
        prompt = None
        if with_prompt_logprobs:
            prompt = PromptLogprobs(*_logprobs_of(model.compute_logits(hidden), batch.next_tokens,
                                                  self.num_logprobs))
        return result, prompt, kv_cache

    def warmup(self) -> None:
        """Compile every bucket now (with a progress bar) so that serving never waits on the compiler."""
        buckets = self.config.token_buckets()
        for bucket in tqdm(buckets, desc="compiling step buckets", unit="bucket"):
            batch = self._empty_batch(bucket)
            result, _, self.kv_cache = self._step(self.params, self.kv_cache, batch, with_prompt_logprobs=False)
            jax.block_until_ready(result.tokens)

    def execute(self, out: SchedulerOutput) -> tuple[SampleResult, PromptLogprobs | None]:
        """Run one step; results come back to the host as numpy arrays."""
        want_prompt = any(c.request.params.prompt_logprobs is not None
                          and c.start < c.request.num_prompt_tokens for c in out.chunks)
        batch = self._pack(out)
        result, prompt, self.kv_cache = self._step(self.params, self.kv_cache, batch,
                                                   with_prompt_logprobs=want_prompt)
        return jax.device_get((result, prompt))

    def _bucket(self, num_tokens: int) -> int:
        return next(b for b in self.config.token_buckets() if b >= num_tokens)

    def _empty_batch(self, bucket: int) -> StepBatch:
        num_seqs = self.config.seq_bucket(bucket)
        return self._arrays(bucket, num_seqs).to_batch()

    def _arrays(self, bucket: int, num_seqs: int) -> "_HostBatch":
        return _HostBatch.empty(bucket, num_seqs, self.pages_per_seq, self.max_model_len)

    def _pack(self, out: SchedulerOutput) -> StepBatch:
        bucket = self._bucket(out.num_tokens)
        host = self._arrays(bucket, self.config.seq_bucket(bucket))
        for row, chunk in enumerate(out.chunks):
            host.add(row, chunk.request, chunk.start, chunk.num_tokens)
        return host.to_batch()


@dataclasses.dataclass
class _HostBatch:
    """Numpy staging arrays for one step (padding rows: greedy, no penalties, no tokens)."""

    tokens: np.ndarray
    positions: np.ndarray
    next_tokens: np.ndarray
    cu_q_lens: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    logits_indices: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    min_p: np.ndarray
    presence: np.ndarray
    frequency: np.ndarray
    repetition: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray
    history: np.ndarray
    prompt_lens: np.ndarray
    banned: np.ndarray
    num_seqs: int = 0

    @classmethod
    def empty(cls, bucket: int, num_seqs: int, pages_per_seq: int, max_model_len: int) -> "_HostBatch":
        f32 = functools.partial(np.zeros, num_seqs, np.float32)
        return cls(
            tokens=np.zeros(bucket, np.int32), positions=np.zeros(bucket, np.int32),
            next_tokens=np.full(bucket, -1, np.int32), cu_q_lens=np.zeros(num_seqs + 1, np.int32),
            kv_lens=np.zeros(num_seqs, np.int32), page_indices=np.zeros((num_seqs, pages_per_seq), np.int32),
            logits_indices=np.zeros(num_seqs, np.int32), temperature=f32(), top_p=np.ones(num_seqs, np.float32),
            top_k=np.zeros(num_seqs, np.int32), min_p=f32(), presence=f32(), frequency=f32(),
            repetition=np.ones(num_seqs, np.float32), seeds=np.zeros(num_seqs, np.uint32),
            steps=np.zeros(num_seqs, np.int32), history=np.full((num_seqs, max_model_len), -1, np.int32),
            prompt_lens=np.zeros(num_seqs, np.int32), banned=np.full((num_seqs, MAX_BANNED), -1, np.int32))

    def add(self, row: int, request: Request, start: int, num_tokens: int) -> None:
        first, end = self.cu_q_lens[row], self.cu_q_lens[row] + num_tokens
        self.cu_q_lens[row + 1:] = end
        self.tokens[first:end] = request.token_ids[start:start + num_tokens]
        self.positions[first:end] = np.arange(start, start + num_tokens)
        following = request.token_ids[start + 1:start + num_tokens + 1]
        self.next_tokens[first:first + len(following)] = following
        self.kv_lens[row] = start + num_tokens
        self.page_indices[row, :len(request.pages)] = request.pages
        self.logits_indices[row] = end - 1
        self.num_seqs = row + 1
        self._add_sampling(row, request)

    def _add_sampling(self, row: int, request: Request) -> None:
        p = request.params
        self.temperature[row], self.top_p[row], self.top_k[row], self.min_p[row] = (
            p.temperature, p.top_p, p.top_k, p.min_p)
        self.presence[row], self.frequency[row] = p.presence_penalty, p.frequency_penalty
        self.repetition[row] = p.repetition_penalty
        self.seeds[row], self.steps[row] = request.seed, request.num_output_tokens
        self.prompt_lens[row] = request.num_prompt_tokens
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            self.history[row, :len(request.token_ids)] = request.token_ids
        if request.num_output_tokens < p.min_tokens:
            self.banned[row, :len(request.min_tokens_banned)] = request.min_tokens_banned

    def to_batch(self) -> StepBatch:
        md = AttentionMetadata(self.cu_q_lens, self.kv_lens, self.page_indices,
                               np.asarray([self.num_seqs], np.int32))
        sampling = SamplingInputs(self.temperature, self.top_p, self.top_k, self.min_p, self.presence,
                                  self.frequency, self.repetition, self.seeds, self.steps, self.history,
                                  self.prompt_lens, self.banned)
        return jax.device_put(StepBatch(self.tokens, self.positions, md, self.logits_indices, self.next_tokens,
                                        sampling))
