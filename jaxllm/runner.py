"""The model runner: packs a scheduled step into bucketed device arrays and runs the one compiled step.

The step (forward pass and sampling) is a single jitted function with the KV cache donated. Its shapes
come from a fixed set of buckets (padded token count; the sequence count follows it), all compiled at
start-up, before the KV cache takes the device memory (XLA's autotuner times its GEMM candidates in free
memory), so serving never compiles; a restart loads them from the step cache (`compilation.StepCache`)
without tracing them again. Prompt logprobs need logits for every row; that variant is compiled the first
time a request asks for them.

Host cost per step is kept small the way vLLM's persistent batch does it: what belongs to a request for its
whole run (sampling settings, seed, banned ids) sits in per-slot host tables filled once, the page table
lives on the device with a row per slot (a step sends only the pages handed out since the last one), and
the token statistics of the penalties stay on the device (`PenaltyState`), so a step gathers rows by slot
into two reused flat staging buffers (int32 and float32) and transfers just those two. A decode-only batch
can run `num_scheduler_steps` steps in one call: a loop inside the compiled step feeds each sampled token
back as the next input, so the host pays once for several tokens. Each multi-step decode bucket is compiled
four times, so that the host, not a run-time `cond`, decides whether the batch filters (top-k/top-p/min-p)
or wants logprobs (`sampling.SamplerKind`: XLA:GPU decides a `cond` on the host, waiting for the device,
which kept the host from queuing steps ahead): plain, without either; top-p and filter, for batches that
filter; and full, with both for every row, for batches that want logprobs. On GPUs each single-step bucket
is compiled three times: plain, top-p (the filter without top-k, as generation configs set it), and one that
decides at run time for batches with top-k or logprobs; elsewhere a `cond` does not hold the host back, and
the run-time program serves every single step.

`dispatch` starts a step and returns; `fetch` waits for its results. The engine dispatches step N+1 before
it fetches step N, so a sequence's input token may be one step N is still sampling: the step keeps each
slot's last sampled token on the device (`last_tokens`) and reads it for the sequences marked `from_device`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxllm import distributed
from jaxllm.compilation import StepCache, settings_parts
from jaxllm.distributed import PenaltyReset, StepMessage
from jaxllm.engine_config import EngineConfig
from jaxllm.parallel import ShardingRules, kv_cache_sharding, padded_layers
from jaxllm.request import Request
from jaxllm.sampling import (
    PenaltyState,
    SampleResult,
    SamplerKind,
    SamplingInputs,
    empty_penalty_state,
    filters_any,
    ranks_and_top,
    record,
    reset_row,
    sample,
)
from jaxllm.scheduler import ScheduledChunk, SchedulerOutput
from pallas_kernels import AttentionMetadata, kv_cache_shape, token_layout

logger = logging.getLogger(__name__)

MAX_BANNED = 64  # token ids a row may ban at once (EOS and stop_token_ids under min_tokens)
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_FLOAT_DEFAULTS = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)  # padding rows: greedy, no penalties
# Fields of the int32 staging buffer start on 256-byte boundaries: XLA may hand a field to a kernel as a slice
# of the buffer, and Mosaic GPU kernels refuse inputs that are not 256-byte aligned.
_ALIGN = 64
PAGE_UPDATES = 256  # (slot, column, page) entries written into the device page table per update call
PROMPT_LOGPROB_ROWS = 256  # rows of a step whose prompt logprobs are computed together


class StepKey(NamedTuple):
    """Which compiled program runs a step: its token bucket, decode steps per call, whether it computes prompt
    logprobs, and how it samples (`sampling.SamplerKind`)."""

    bucket: int
    num_steps: int
    with_prompt_logprobs: bool = False
    sampler: SamplerKind = SamplerKind.RUN_TIME


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each int32 field of a step's inputs sits in the flat int32 staging buffer of a bucket (floats
    are `FLOAT_FIELDS` rows of `[6, S]`). One layout serves the host views and the unpacking in the step."""

    num_seqs: int
    fields: tuple[tuple[str, tuple[int, ...], int], ...]  # name, shape, offset
    size: int

    @classmethod
    def of(cls, num_tokens: int, num_seqs: int) -> "_Layout":
        t, s = num_tokens, num_seqs
        shapes = [("tokens", (t,)), ("next_tokens", (t,)), ("cu_q_lens", (s + 1,)), ("kv_lens", (s,)),
                  ("logits_indices", (s,)), ("slots", (s,)), ("top_k", (s,)), ("seeds", (s,)), ("steps", (s,)),
                  ("min_tokens", (s,)), ("step_limits", (s,)), ("keep", (s,)), ("from_device", (s,)),
                  ("num_seqs", (1,)), ("want_logprobs", (1,)), ("banned", (s, MAX_BANNED))]
        fields, offset = [], 0
        for name, shape in shapes:
            fields.append((name, shape, offset))
            offset += -(-math.prod(shape) // _ALIGN) * _ALIGN
        return cls(s, tuple(fields), offset)

    def views(self, ints):
        """`{name: array}` over `ints` (numpy views on the host; slices inside the step)."""
        return {name: ints[at:at + math.prod(shape)].reshape(shape) for name, shape, at in self.fields}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Everything one step needs, padded to a bucket (unpacked on the device from the staging buffers)."""

    tokens: jax.Array  # [T]
    md: AttentionMetadata
    logits_indices: jax.Array  # [S] the row whose logits each sequence samples from
    next_tokens: jax.Array  # [T] the token following each row (prompt logprobs), -1 if none
    keep: jax.Array  # [S] bool, the sample is the sequence's next token (its chunk completes)
    from_device: jax.Array  # [S] bool, the sequence's (one) token is the one its slot sampled last
    step_limits: jax.Array  # [S] decode steps each sequence takes in a multi-step call
    sampling: SamplingInputs

    @classmethod
    def unpack(cls, layout: _Layout, ints: jax.Array, floats: jax.Array, page_table: jax.Array) -> "StepBatch":
        """The step's inputs; each sequence's pages are its slot's row of the device page table (padding rows
        take the spare all-zero row past the slots)."""
        v = layout.views(ints)
        f = dict(zip(FLOAT_FIELDS, floats))
        sampling = SamplingInputs(
            f["temperature"], f["top_p"], v["top_k"], f["min_p"], f["presence_penalty"], f["frequency_penalty"],
            f["repetition_penalty"], jax.lax.bitcast_convert_type(v["seeds"], jnp.uint32), v["steps"], v["slots"],
            v["min_tokens"], v["banned"], v["want_logprobs"][0] > 0)
        pages = jnp.take(page_table, v["slots"], axis=0, mode="clip")
        md = AttentionMetadata(v["cu_q_lens"], v["kv_lens"], pages, v["num_seqs"])
        return cls(v["tokens"], md, v["logits_indices"], v["next_tokens"], v["keep"] > 0, v["from_device"] > 0,
                   v["step_limits"], sampling)

    def with_device_tokens(self, last_tokens: jax.Array) -> "StepBatch":
        """The batch with each `from_device` sequence's token taken from `last_tokens[slot]` (what the previous
        step sampled for it, which the host did not have when it packed this step)."""
        first = self.md.cu_q_lens[:-1]
        current = jnp.take(self.tokens, first, mode="clip")
        device = jnp.take(last_tokens, self.sampling.slots, mode="clip")
        tokens = self.tokens.at[first].set(jnp.where(self.from_device, device, current), mode="drop")
        return dataclasses.replace(self, tokens=tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    token_logprobs: jax.Array  # [T] logprob of next_tokens
    ranks: jax.Array  # [T]
    top_ids: jax.Array  # [T, N]
    top_logprobs: jax.Array  # [T, N]


@dataclasses.dataclass(frozen=True)
class InFlightStep:
    """A dispatched step: its results still on the devices (possibly still being computed)."""

    result: SampleResult
    prompt: PromptLogprobs | None
    want_logprobs: bool


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """A step's results on the host: `[K, S]` for K decode steps (1 unless multi-step) of S rows. Ranks and
    top logprobs are fetched only when a request of the step asked for logprobs."""

    tokens: np.ndarray  # [K, S]
    logprobs: np.ndarray  # [K, S]
    ranks: np.ndarray | None  # [K, S]
    top_ids: np.ndarray | None  # [K, S, N]
    top_logprobs: np.ndarray | None  # [K, S, N]
    prompt: PromptLogprobs | None  # numpy leaves, when the step computed prompt logprobs


def _logprobs_of(logits: jax.Array, targets: jax.Array, num: int):
    raw = jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(raw, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return (target_lp, *ranks_and_top(raw, target_lp, num))


def _prompt_logprobs(model, hidden: jax.Array, targets: jax.Array, num: int) -> "PromptLogprobs":
    """Prompt logprobs of every row, `PROMPT_LOGPROB_ROWS` rows at a time: all rows at once would hold
    `[rows, vocab]` float32 logits (1 GiB for 2,048 rows of a 128k vocabulary) beyond the step's budgeted
    workspace, and this variant is compiled after the KV cache has taken the memory."""
    rows, size = hidden.shape[0], PROMPT_LOGPROB_ROWS
    chunks = -(-rows // size)
    hidden = jnp.pad(hidden, ((0, chunks * size - rows), (0, 0))).reshape(chunks, size, hidden.shape[1])
    targets = jnp.pad(targets, (0, chunks * size - rows), constant_values=-1).reshape(chunks, size)
    parts = jax.lax.map(lambda x: _logprobs_of(model.compute_logits(x[0]), x[1], num), (hidden, targets))
    return PromptLogprobs(*(p.reshape(chunks * size, *p.shape[2:])[:rows] for p in parts))


def _positions(md: AttentionMetadata, num_tokens: int) -> jax.Array:
    return token_layout(md, num_tokens)[1]


class ModelRunner:
    """Holds the parameters, the KV cache and the penalty state on the device and runs steps."""

    def __init__(self, config: EngineConfig, model: nnx.Module, mesh: jax.sharding.Mesh,
                 rules: ShardingRules = ShardingRules()):
        self.config = config
        self.model_config = model.cfg
        # The values the cache holds, and how it stores them: an 8-bit float cache as bytes, which the model's
        # attention reads as `kv_cache_format` (`pallas_kernels.reference.cache_values`).
        self.cache_format = config.cache_dtype(model.cfg.jnp_dtype)
        self.cache_dtype = jnp.dtype(jnp.uint8) if self.cache_format.itemsize == 1 else self.cache_format
        model.kv_cache_format = self.cache_format.name if self.cache_format.itemsize == 1 else None
        self.graphdef, self.params = nnx.split(model)
        self.max_model_len = config.max_model_len
        self.pages_per_seq = -(-config.max_model_len // config.block_size)
        self.num_logprobs = max(config.max_logprobs, 1)
        self.num_scheduler_steps = config.num_scheduler_steps
        self.mesh, self.rules = mesh, rules
        self.kv_cache: jax.Array | None = None
        self.cache_sharding = self._cache_sharding(1)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rows, vocab = config.max_num_seqs, self.model_config.vocab_size
        self.penalties: PenaltyState = jax.jit(lambda: empty_penalty_state(rows, vocab), out_shardings=replicated)()
        self._reset_row = jax.jit(reset_row, donate_argnums=(0,), out_shardings=replicated)
        # A row per slot and a spare all-zero row for padding sequences.
        self.page_table = jax.jit(lambda: jnp.zeros((rows + 1, self.pages_per_seq), jnp.int32),
                                  out_shardings=replicated)()
        self._set_pages = jax.jit(_set_pages, donate_argnums=(0,), out_shardings=replicated)
        # The token each slot sampled last (and a spare row for padding sequences): the next step's input for a
        # sequence whose token the host has not received yet.
        self.last_tokens = jax.jit(lambda: jnp.zeros(rows + 1, jnp.int32), out_shardings=replicated)()
        self._page_updates: list[np.ndarray] = []
        self.slots = _SlotTable.empty(rows)
        self._layouts = {b: _Layout.of(b, config.seq_bucket(b)) for b in config.token_buckets()}
        self._staging = {b: _Staging.empty(layout, rows) for b, layout in self._layouts.items()}
        # Across hosts the results must be replicated, so that process 0 holds them whole.
        results = replicated if distributed.is_multiprocess() else None
        self._step = jax.jit(self._forward, donate_argnums=(1, 2, 3),
                             static_argnames=("bucket", "num_steps", "with_prompt_logprobs", "sampler"),
                             out_shardings=(results, results, self.cache_sharding, replicated, replicated))
        self._executables: dict[StepKey, jax.stages.Compiled] = {}
        # XLA:GPU decides a `cond` on the host, after the device gets there: a single step with the sampler's
        # run-time `cond`s keeps the host from queuing the next step (and, after a multi-step call, from
        # processing that call's results) while the GPU runs it. There, batches that need neither stage, or
        # only min-p and top-p, run a single step without them.
        self.single_step_samplers = ((SamplerKind.RUN_TIME, SamplerKind.PLAIN, SamplerKind.TOP_P)
                                     if mesh.devices.flat[0].platform == "gpu" else (SamplerKind.RUN_TIME,))
        self.step_cache = StepCache.create(config.cache_dir() / "steps", mesh, settings_parts(config),
                                           self.model_config, rules, self.graphdef)
        self._resets: list[PenaltyReset] = []
        self.channel = distributed.StepChannel() if distributed.is_multiprocess() else None

    def _cache_shape(self, num_pages: int) -> tuple:
        cfg = self.model_config
        layers = padded_layers(cfg.num_layers, self.mesh.shape["pipeline"])  # pipeline stages' identity layers
        return kv_cache_shape(layers, num_pages, self.config.block_size, cfg.num_kv_heads, cfg.head_dim)

    def _cache_sharding(self, num_pages: int) -> jax.sharding.NamedSharding:
        return kv_cache_sharding(self._cache_shape(num_pages), self.mesh, self.rules)

    def page_bytes_per_device(self) -> int:
        """Bytes one KV page takes on each device, as the cache's sharding splits it (a stage's layers, the
        device's KV heads, or all of them where the heads are replicated)."""
        shape = self._cache_shape(1)
        per_device = self._cache_sharding(1).shard_shape(shape)
        return math.prod(per_device) * self.cache_dtype.itemsize

    def allocate_kv_cache(self, num_pages: int) -> None:
        shape, dtype = self._cache_shape(num_pages), self.cache_dtype
        self.kv_cache = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding)()

    def workspace_bytes(self) -> int:
        """Device memory a step needs besides the parameters and the cache, as XLA counts it for the largest
        bucket (vLLM profiles a dummy run for the same reason)."""
        compiled = self._compile(StepKey(self.config.token_buckets()[-1], 1), self.pages_per_seq)
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def _compile(self, key: StepKey, num_pages: int):
        """The step compiled ahead of time for a cache of `num_pages` pages (the cache need not exist yet)."""
        cache = jax.ShapeDtypeStruct(self._cache_shape(num_pages), self.cache_dtype,
                                     sharding=self._cache_sharding(num_pages))
        staging = self._staging[key.bucket]
        args = (self.params, cache, self.penalties, self.last_tokens, self.page_table, staging.ints, staging.floats)
        static = key._asdict()
        return self.step_cache.get(static, args, lambda: self._step.lower(*args, **static).compile())

    def compile_steps(self, num_pages: int) -> int:
        """Compile every variant serving uses, with a progress bar, before the cache of `num_pages` pages is
        allocated: the single step of each bucket and the multi-step decode of each bucket a decode batch
        can take (each of the multi-step `SamplerKind`s); on GPUs, each bucket's single step once per sampler in
        `single_step_samplers`. Returns how many variants there are."""
        variants = [StepKey(b, 1, sampler=kind) for b in self.config.token_buckets()
                    for kind in self.single_step_samplers]
        if self.num_scheduler_steps > 1:
            variants += [StepKey(b, self.num_scheduler_steps, sampler=kind) for b in self._decode_buckets()
                         for kind in (SamplerKind.FULL, SamplerKind.FILTER, SamplerKind.TOP_P, SamplerKind.PLAIN)]
        for key in tqdm(variants, desc="compiling step buckets", unit="bucket"):
            self._executables[key] = self._compile(key, num_pages)
        return len(variants)

    def _forward(self, params, kv_cache, penalties: PenaltyState, last_tokens, page_table, ints, floats, bucket: int,
                 num_steps: int, with_prompt_logprobs: bool, sampler: SamplerKind):
        model = nnx.merge(self.graphdef, params)
        batch = StepBatch.unpack(self._layouts[bucket], ints, floats, page_table).with_device_tokens(last_tokens)
        if num_steps > 1:
            return self._decode_loop(model, kv_cache, penalties, last_tokens, batch, num_steps, sampler)
        hidden, kv_cache = model(batch.tokens, _positions(batch.md, bucket), kv_cache, batch.md)
        result = sample(model.compute_logits(hidden[batch.logits_indices]), batch.sampling, penalties,
                        self.num_logprobs, sampler)
        penalties = record(penalties, batch.sampling.slots, result.tokens, batch.keep)
        last_tokens = _remember(last_tokens, batch.sampling.slots, result.tokens, batch.keep)
        prompt = None
        if with_prompt_logprobs:
            prompt = _prompt_logprobs(model, hidden, batch.next_tokens, self.num_logprobs)
        return jax.tree.map(lambda x: x[None], result), prompt, kv_cache, penalties, last_tokens

    def _decode_loop(self, model, kv_cache, penalties: PenaltyState, last_tokens, batch: StepBatch, num_steps: int,
                     sampler: SamplerKind):
        """`num_steps` decode steps of one-token rows, each step's samples fed back as the next inputs. Step
        `i` runs the rows with `i < step_limits` (the others take no query token, as padding rows do); the
        scheduler reserved their pages. Results are `[num_steps, S]`."""
        num_tokens, num_seqs = batch.tokens.shape[0], batch.logits_indices.shape[0]

        def one_step(i, carry):
            kv_cache, penalties, last_tokens, inputs, results = carry
            active = i < batch.step_limits
            cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(active.astype(jnp.int32))])
            tokens = jnp.zeros(num_tokens, jnp.int32).at[jnp.where(active, cu_q_lens[:-1], num_tokens)].set(
                inputs, mode="drop")
            md = AttentionMetadata(cu_q_lens, jnp.where(active, batch.md.kv_lens + i, 0), batch.md.page_indices,
                                   batch.md.num_seqs)
            hidden, kv_cache = model(tokens, _positions(md, num_tokens), kv_cache, md)
            sampling = dataclasses.replace(batch.sampling, steps=batch.sampling.steps + i)
            result = sample(model.compute_logits(hidden[jnp.maximum(cu_q_lens[1:] - 1, 0)]), sampling, penalties,
                            self.num_logprobs, sampler)
            penalties = record(penalties, sampling.slots, result.tokens, batch.keep & active)
            last_tokens = _remember(last_tokens, sampling.slots, result.tokens, batch.keep & active)
            results = jax.tree.map(lambda acc, x: acc.at[i].set(x), results, result)
            return kv_cache, penalties, last_tokens, result.tokens, results

        shapes = jax.eval_shape(lambda: sample(jnp.zeros((num_seqs, self.model_config.vocab_size)), batch.sampling,
                                               penalties, self.num_logprobs))
        results = jax.tree.map(lambda s: jnp.zeros((num_steps,) + s.shape, s.dtype), shapes)
        carry = (kv_cache, penalties, last_tokens, batch.tokens[batch.logits_indices], results)
        kv_cache, penalties, last_tokens, _, results = jax.lax.fori_loop(0, num_steps, one_step, carry)
        return results, None, kv_cache, penalties, last_tokens

    def warmup(self) -> None:
        """Run every compiled variant once on the allocated cache (first runs set up what the device keeps
        between runs), and compile the penalty-row reset, so that serving never waits."""
        for key, executable in self._executables.items():
            staging = self._staging[key.bucket]
            result, _, self.kv_cache, self.penalties, self.last_tokens = executable(
                self.params, self.kv_cache, self.penalties, self.last_tokens, self.page_table, staging.ints,
                staging.floats)
            jax.block_until_ready(result.tokens)
        self._write_pages(np.full((1, 3), self.page_table.shape[0], np.int32))  # a dropped row: compiles the update
        self.penalties = self._reset_row(self.penalties, np.int32(0), np.full(self.max_model_len, -1, np.int32),
                                         np.int32(0))

    def _decode_buckets(self) -> list[int]:
        """The token buckets of decode-only batches (one token per sequence, at most max_num_seqs)."""
        buckets = self.config.token_buckets()
        return buckets[:buckets.index(self._bucket(min(self.config.max_num_seqs, buckets[-1]))) + 1]

    def dispatch(self, out: SchedulerOutput) -> "InFlightStep":
        """Start one step (several decode steps when the scheduler extended its chunks) on the devices and
        return without waiting for it; `fetch` brings its results to the host."""
        want_prompt = any(c.request.params.prompt_logprobs is not None
                          and c.start < c.request.num_prompt_tokens for c in out.chunks)
        num_steps = self.num_scheduler_steps if any(c.num_steps > 1 for c in out.chunks) else 1
        bucket = self._bucket(out.num_tokens)
        staging = self._staging[bucket]
        want_logprobs = self._pack(out, staging, want_prompt)
        sampler = self._sampler_kind(num_steps, want_logprobs or want_prompt, staging)
        pages = np.concatenate(self._page_updates) if self._page_updates else np.zeros((0, 3), np.int32)
        # Copies: the staging buffers are refilled for the next step while this one may still be reading them.
        message = StepMessage(bucket, num_steps, want_prompt, staging.ints.copy(), staging.floats.copy(),
                              tuple(self._resets), pages, sampler=sampler)
        self._resets.clear()
        self._page_updates.clear()
        if self.channel is not None:
            self.channel.publish(message)
        return InFlightStep(*self._guarded(lambda: self._run(message)), want_logprobs)

    def _sampler_kind(self, num_steps: int, want_logprobs: bool, staging: "_Staging") -> SamplerKind:
        """The least the batch's rows need: logprobs (prompt logprobs included) take the full sampler, top-k the
        filter, min-p or top-p the top-p filter. A single step whose kind was not compiled decides at run time."""
        kind = (SamplerKind.FULL if want_logprobs else SamplerKind.FILTER if staging.uses_top_k()
                else SamplerKind.TOP_P if staging.filters() else SamplerKind.PLAIN)
        if num_steps == 1 and kind not in self.single_step_samplers:
            return SamplerKind.RUN_TIME
        return kind

    def fetch(self, step: "InFlightStep") -> StepOutput:
        """Wait for a dispatched step; its results as numpy arrays, only those its requests need."""
        return self._guarded(lambda: self._fetch(step.result, step.prompt, step.want_logprobs))

    def _guarded(self, call):
        """`call()`; across hosts, a failed collective means a follower is gone, which ends this process."""
        if self.channel is None:
            return call()
        try:
            return call()
        except jax.errors.JaxRuntimeError as e:
            distributed.lost(f"step {self.channel.next - 1} failed, {distributed.followers()} is likely gone "
                             f"({distributed.message_of(e)})")

    def _run(self, message: StepMessage) -> tuple[SampleResult, PromptLogprobs | None]:
        """Dispatch one step on the devices: the penalty resets and page-table updates, then the compiled step.
        The leader and every follower run exactly this, in the same order."""
        for reset in message.resets:
            self.penalties = self._reset_row(self.penalties, np.int32(reset.slot), reset.tokens,
                                             np.int32(reset.num_prompt_tokens))
        self._write_pages(message.page_updates)
        key = StepKey(message.bucket, message.num_steps, message.with_prompt_logprobs, message.sampler)
        if key not in self._executables:  # prompt logprobs: compiled on first use
            self._executables[key] = self._compile(key, self.kv_cache.shape[1])
        result, prompt, self.kv_cache, self.penalties, self.last_tokens = self._executables[key](
            self.params, self.kv_cache, self.penalties, self.last_tokens, self.page_table,
            jax.device_put(message.ints), jax.device_put(message.floats))
        return result, prompt

    def _write_pages(self, updates: np.ndarray) -> None:
        """Write `(slot, column, page)` rows into the device page table, `PAGE_UPDATES` at a time (the last
        call padded with rows past the table, which are dropped)."""
        for start in range(0, len(updates), PAGE_UPDATES):
            chunk = np.full((PAGE_UPDATES, 3), self.page_table.shape[0], np.int32)
            chunk[:len(updates) - start] = updates[start:start + PAGE_UPDATES]
            self.page_table = self._set_pages(self.page_table, chunk)

    @staticmethod
    def _fetch(result: SampleResult, prompt: PromptLogprobs | None, want_logprobs: bool) -> StepOutput:
        top = (result.ranks, result.top_ids, result.top_logprobs) if want_logprobs else (None, None, None)
        tokens, logprobs, top, prompt = jax.device_get((result.tokens, result.logprobs, top, prompt))
        return StepOutput(tokens, logprobs, *top, prompt)

    def follow(self) -> None:
        """A follower's loop: run the leader's steps as they come, until it shuts down. A step that fails
        here (a collective lost its peers) ends the process (`distributed.lost`)."""
        while not isinstance(message := self.channel.receive(), distributed.Shutdown):
            try:
                jax.block_until_ready(self._run(message))
            except jax.errors.JaxRuntimeError as e:
                distributed.lost(f"step {self.channel.next - 1} failed ({distributed.message_of(e)})")

    def _bucket(self, num_tokens: int) -> int:
        return next(b for b in self.config.token_buckets() if b >= num_tokens)

    def _pack(self, out: SchedulerOutput, staging: "_Staging", want_prompt: bool) -> bool:
        """Fill `staging` for `out`; returns whether a request of the step wants logprobs."""
        for chunk in out.chunks:
            if chunk.new:
                self._take_slot(chunk.request)
            new_pages = self.slots.sync_pages(chunk.request)
            if new_pages is not None:
                self._page_updates.append(new_pages)
        return staging.fill(out, self.slots, want_prompt)

    def _take_slot(self, request: Request) -> None:
        """Fill the request's slot rows; a request with penalties also gets its device statistics reset (by
        the step, which runs the resets first)."""
        if self.slots.assign(request):
            tokens = np.full(self.max_model_len, -1, np.int32)
            tokens[:len(request.token_ids)] = request.token_ids
            self._resets.append(PenaltyReset(request.slot, tokens, request.num_prompt_tokens))


def _remember(last_tokens: jax.Array, slots: jax.Array, tokens: jax.Array, keep: jax.Array) -> jax.Array:
    """`last_tokens[slot] = token` for the sequences whose sample is kept (the others go to the spare row)."""
    return last_tokens.at[jnp.where(keep, slots, last_tokens.shape[0] - 1)].set(tokens, mode="drop")


def _set_pages(table: jax.Array, updates: jax.Array) -> jax.Array:
    """`table[slot, column] = page` for each row of `updates [N, 3]` (rows past the table are dropped)."""
    return table.at[updates[:, 0], updates[:, 1]].set(updates[:, 2], mode="drop")


@dataclasses.dataclass
class _SlotTable:
    """Host rows per scheduler slot, written when a request takes the slot and gathered by slot each step."""

    floats: np.ndarray  # [6, R] FLOAT_FIELDS
    top_k: np.ndarray  # [R]
    seeds: np.ndarray  # [R] the uint32 seed's bits as int32
    min_tokens: np.ndarray  # [R]
    want_logprobs: np.ndarray  # [R] bool
    banned: np.ndarray  # [R, MAX_BANNED]
    num_pages: np.ndarray  # [R] pages of the slot's request already sent to the device page table

    @classmethod
    def empty(cls, rows: int) -> "_SlotTable":
        zeros = np.zeros(rows, np.int32)
        return cls(np.repeat(_FLOAT_DEFAULTS[:, None], rows, axis=1), zeros.copy(), zeros.copy(), zeros.copy(),
                   np.zeros(rows, bool), np.full((rows, MAX_BANNED), -1, np.int32), zeros.copy())

    def assign(self, request: Request) -> bool:
        """Write `request`'s rows into its slot; returns whether it uses penalties."""
        slot, p = request.slot, request.params
        self.floats[:, slot] = (p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
                                p.repetition_penalty)
        self.top_k[slot], self.min_tokens[slot] = p.top_k, p.min_tokens
        self.seeds[slot] = np.uint32(request.seed).view(np.int32)
        self.want_logprobs[slot] = p.logprobs is not None
        self.banned[slot] = -1
        self.banned[slot, :len(request.min_tokens_banned)] = request.min_tokens_banned
        self.num_pages[slot] = 0
        return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)

    def sync_pages(self, request: Request) -> np.ndarray | None:
        """`(slot, column, page)` rows of the pages the request got since the last step, None if none (a
        running request's pages only grow; a request taking a slot starts from none)."""
        slot, have = request.slot, int(self.num_pages[request.slot])
        if len(request.pages) == have:
            return None
        new = np.asarray(request.pages[have:], np.int32)
        self.num_pages[slot] = len(request.pages)
        return np.stack([np.full(len(new), slot, np.int32), np.arange(have, have + len(new), dtype=np.int32), new],
                        axis=1)


@dataclasses.dataclass
class _Staging:
    """The reused host buffers of one bucket: flat int32 (see `_Layout`) and `[6, S]` float32."""

    layout: _Layout
    ints: np.ndarray
    floats: np.ndarray
    views: dict[str, np.ndarray]
    padding_slot: int  # a slot past the table: padding rows' samples are not recorded

    @classmethod
    def empty(cls, layout: _Layout, num_slots: int) -> "_Staging":
        ints = np.zeros(layout.size, np.int32)
        floats = np.repeat(_FLOAT_DEFAULTS[:, None], layout.num_seqs, axis=1)
        staging = cls(layout, ints, floats, layout.views(ints), num_slots)
        staging.views["next_tokens"][:] = -1
        staging.views["banned"][:] = -1
        staging.views["slots"][:] = num_slots
        return staging

    def fill(self, out: SchedulerOutput, table: _SlotTable, want_prompt: bool) -> bool:
        """Write the step's rows (padding rows reset to their defaults); returns whether any wants logprobs."""
        v, chunks, n = self.views, out.chunks, len(out.chunks)
        slots = np.fromiter((c.request.slot for c in chunks), np.int32, n)
        starts = np.fromiter((c.start for c in chunks), np.int32, n)
        ends = starts + np.fromiter((c.num_tokens for c in chunks), np.int32, n)
        cu = np.cumsum(ends - starts, dtype=np.int32)
        num_tokens = int(cu[-1])
        self._fill_tokens(chunks, num_tokens, want_prompt)
        v["cu_q_lens"][1:n + 1], v["cu_q_lens"][n + 1:] = cu, num_tokens
        self._rows("kv_lens", ends, 0)
        self._rows("logits_indices", cu - 1, 0)
        self._rows("slots", slots, self.padding_slot)
        for name in ("top_k", "seeds", "min_tokens"):
            self._rows(name, getattr(table, name)[slots], 0)
        self._rows("steps", np.fromiter((c.request.num_tokens - c.request.num_prompt_tokens for c in chunks),
                                        np.int32, n), 0)
        self._rows("from_device", np.fromiter((c.from_device for c in chunks), np.int32, n), 0)
        self._rows("step_limits", np.fromiter((c.num_steps for c in chunks), np.int32, n), 0)
        self._rows("keep", np.fromiter((c.completes for c in chunks), np.int32, n), 0)
        v["banned"][:n] = table.banned[slots]
        v["num_seqs"][0] = n
        want_logprobs = bool(table.want_logprobs[slots].any())
        v["want_logprobs"][0] = want_logprobs
        self.floats[:, :n] = table.floats[:, slots]
        self.floats[:, n:] = _FLOAT_DEFAULTS[:, None]
        return want_logprobs

    def filters(self) -> bool:
        """Whether a row of the filled step keeps only part of the vocabulary (padding rows never do)."""
        top_p, min_p = (self.floats[FLOAT_FIELDS.index(name)] for name in ("top_p", "min_p"))
        return bool(filters_any(self.views["top_k"], top_p, min_p))

    def uses_top_k(self) -> bool:
        """Whether a row of the filled step keeps only its top k tokens."""
        return bool((self.views["top_k"] > 0).any())

    def _rows(self, name: str, values: np.ndarray, padding: int) -> None:
        view = self.views[name]
        view[:len(values)], view[len(values):] = values, padding

    def _fill_tokens(self, chunks: list[ScheduledChunk], num_tokens: int, want_prompt: bool) -> None:
        v = self.views
        if num_tokens == len(chunks):  # one token each: decodes (a pending one is filled in on the device)
            tokens = np.fromiter((0 if c.from_device else c.request.token_ids[c.start] for c in chunks), np.int32,
                                 num_tokens)
        else:
            tokens = np.concatenate([[0] if c.from_device else c.request.token_ids[c.start:c.start + c.num_tokens]
                                     for c in chunks])
        v["tokens"][:num_tokens], v["tokens"][num_tokens:] = tokens, 0
        if want_prompt:
            v["next_tokens"][:] = -1
            first = 0
            for c in chunks:
                following = c.request.token_ids[c.start + 1:c.start + c.num_tokens + 1]
                v["next_tokens"][first:first + len(following)] = following
                first += c.num_tokens
