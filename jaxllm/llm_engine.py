"""`LLMEngine`: requests in, `RequestOutput`s out, one `step()` at a time (vLLM's engine API).

Steps run one ahead of the host (vLLM's async scheduling): `step()` schedules and dispatches step N+1
before it waits for step N's tokens, so the devices compute while the host processes. Step N+1 counts the
tokens step N is sampling as pending (`Request.num_pending`) and reads them on the device; a request that
step N finishes (a stop token or string) has its row in step N+1 computed for nothing and dropped.

It owns the model runner (device side), the scheduler (host side) and the output processing, and does the
checks that refuse a request up front rather than leave it hanging: empty prompts, token ids outside the
vocabulary, prompts that cannot fit `max_model_len` or the KV cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Sequence

import jax
import numpy as np
from transformers import GenerationConfig, PreTrainedTokenizerBase

from jaxllm import distributed
from jaxllm.block_pool import BlockPool
from jaxllm.compilation import enable_compilation_cache
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.engine_config import CPU_KV_CACHE_BYTES, EngineConfig
from jaxllm.model_loader import load_model
from jaxllm.output_processor import Completion, RequestGroup, position_logprobs
from jaxllm.outputs import RequestOutput
from jaxllm.parallel import make_mesh
from jaxllm.request import Request
from jaxllm.runner import MAX_BANNED, InFlightStep, ModelRunner, PromptLogprobs, StepOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from jaxllm.weights.sources import load_generation_config, load_tokenizer, resolve_source

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step on its way: what was scheduled and the runner's handle on its results."""

    scheduled: SchedulerOutput
    step: InFlightStep


_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


class LLMEngine:
    """Continuous batching over one model on one mesh."""

    def __init__(self, config: EngineConfig):
        self.config = config
        started = time.perf_counter()
        enable_compilation_cache(config.cache_dir())
        mesh = make_mesh(tensor_parallel_size=config.tensor_parallel_size,
                         pipeline_parallel_size=config.pipeline_parallel_size)
        distributed.check_mesh(mesh)
        loaded = load_model(config.model, dtype=config.resolved_dtype(), mesh=mesh,
                            attention_backend=config.attention_backend, load_format=config.load_format,
                            seed=config.seed, attention_block_sizes=config.attention_block_sizes,
                            quantization=config.quantization)
        self.model_config = loaded.config
        self._resolve_max_model_len(loaded.config.max_position_embeddings)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(
            resolve_source(config.tokenizer or config.model))
        self.generation_config = load_generation_config(loaded.source, loaded.hf_config)
        self.eos_token_ids = self._eos_ids(self.generation_config, self.tokenizer)
        self.runner = ModelRunner(config, loaded.model, mesh)
        num_pages = self._num_pages(mesh)
        logger.info("KV cache: %d pages of %d tokens (%d tokens)", num_pages, config.block_size,
                    num_pages * config.block_size)
        loaded_at = time.perf_counter()
        cache = self.runner.step_cache
        before = cache.loaded, cache.compiled
        num_variants = self.runner.compile_steps(num_pages)
        compiled_at = time.perf_counter()
        self.runner.allocate_kv_cache(num_pages)
        self.runner.warmup()
        ready_at = time.perf_counter()
        logger.info("engine ready in %.1f s: model, tokenizer and cache sizing %.1f s, %d step variants "
                    "(%d loaded from the step cache, %d compiled) %.1f s, KV cache and warm-up %.1f s",
                    ready_at - started, loaded_at - started, num_variants, cache.loaded - before[0],
                    cache.compiled - before[1], compiled_at - loaded_at, ready_at - compiled_at)
        self.scheduler = Scheduler(BlockPool(num_pages, config.block_size), config.max_num_seqs,
                                   config.max_num_batched_tokens, config.num_scheduler_steps, config.max_model_len)
        self.groups: dict[str, RequestGroup] = {}
        self._completions: dict[int, Completion] = {}
        self._seeds = np.random.default_rng(config.seed)
        self._ids = itertools.count()
        self._in_flight: _Dispatched | None = None

    def _resolve_max_model_len(self, model_max: int) -> None:
        if self.config.max_model_len is None:
            self.config.max_model_len = model_max
        elif self.config.max_model_len > model_max:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {model_max}")

    @staticmethod
    def _eos_ids(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase | None) -> frozenset:
        ids = generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return frozenset(ids)

    def _num_pages(self, mesh: jax.sharding.Mesh) -> int:
        """`num_gpu_blocks_override`, else what fits: a fixed budget on CPU, the memory left on accelerators."""
        config = self.config
        if config.num_gpu_blocks_override:
            return config.num_gpu_blocks_override
        page_bytes = self.runner.page_bytes_per_device()
        device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
        stats = device.memory_stats() if device.platform != "cpu" else None
        if not stats:
            return max(CPU_KV_CACHE_BYTES // page_bytes, 1)
        workspace = int(self.runner.workspace_bytes() * 1.2) + (512 << 20)  # margin for the allocator
        logger.info("step workspace: %.2f GiB", workspace / 2**30)
        free = config.memory_budget(device, stats["bytes_limit"]) - stats["bytes_in_use"] - workspace
        # The cache is one buffer: where loading left holes (FP8 weights made from 16-bit ones), it must fit
        # in the largest free block.
        free = min(free, stats.get("largest_free_block_bytes", free) - workspace)
        free = distributed.smallest(int(free))  # one cache shape on every host
        if free < page_bytes:
            raise ValueError(f"no memory left for the KV cache (gpu_memory_utilization="
                             f"{config.gpu_memory_utilization}); raise it or lower max_num_batched_tokens")
        return int(free // page_bytes)

    def follow(self) -> None:
        """On a process other than 0 of a multi-host engine: run process 0's steps until it shuts down."""
        if distributed.is_leader():
            raise RuntimeError("process 0 leads: it steps the engine itself")
        logger.info("process %d of %d: following process 0's steps", jax.process_index(), jax.process_count())
        self.runner.follow()

    # ----- requests -----

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's `generation_config="auto"`: the model's generation_config.json values are the defaults."""
        if self.config.generation_config != "auto":
            return SamplingParams()
        diff = self.generation_config.to_diff_dict()
        return SamplingParams(**{ours: diff[theirs] for theirs, ours in _GENERATION_DEFAULTS.items()
                                 if theirs in diff})

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """A string, `{"prompt": str}`, `{"prompt_token_ids": [...]}` or a list of ids -> (text, ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True); pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it can never be served."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or self.default_sampling_params()
        text, ids = self.tokenize_prompt(prompt)
        max_tokens = self._validate(ids, params)
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**31))
        banned = sorted((set() if params.ignore_eos else self.eos_token_ids) | set(params.stop_token_ids))
        leader = None
        completions = []
        for index in range(params.n):
            request = Request(request_id if params.n == 1 else f"{index}_{request_id}", list(ids), params,
                              max_tokens, _child_seed(seed, index), index=index, leader=leader,
                              min_tokens_banned=banned if params.min_tokens else [])
            if index == 0 and params.prompt_logprobs is not None:
                request.prompt_logprobs.append(None)
            leader = leader or request
            completions.append(Completion(request, request_id, self._detokenizer(ids, params),
                                          self.eos_token_ids, self.config.max_model_len))
        self.groups[request_id] = RequestGroup(request_id, text, list(ids), completions)
        for completion in completions:
            self._completions[id(completion.request)] = completion
            self.scheduler.add(completion.request)

    def _validate(self, ids: list[int], params: SamplingParams) -> int:
        """Refuse what cannot be served; return the request's effective max_tokens."""
        config = self.config
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else config.max_model_len - len(ids)
        if len(ids) + max_tokens > config.max_model_len:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is longer than "
                             f"max_model_len ({config.max_model_len})")
        pool = self.scheduler.pool
        if pool.pages_for(len(ids) + max_tokens) > pool.num_pages:
            raise ValueError(f"the prompt plus max_tokens ({len(ids) + max_tokens} tokens) is longer than the "
                             f"whole KV cache ({pool.num_pages * pool.page_size} tokens)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > config.max_logprobs:
                raise ValueError(f"{name} {value} is more than max_logprobs ({config.max_logprobs})")
        if params.min_tokens and len(self.eos_token_ids | set(params.stop_token_ids)) > MAX_BANNED:
            raise ValueError(f"min_tokens supports at most {MAX_BANNED} stop_token_ids")
        return max_tokens

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                      params.spaces_between_special_tokens)

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        """End requests now, wherever they are; their pages are freed. Unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for request_id in ids:
            group = self.groups.pop(request_id, None)
            if group is None:
                continue
            for completion in group.completions:
                if not completion.request.finished:
                    self.scheduler.finish(completion.request, "abort")
                self._completions.pop(id(completion.request), None)
            outputs.append(group.output())
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ----- stepping -----

    def step(self) -> list[RequestOutput]:
        """Dispatch the next model step (several decode steps for a multi-step batch), then process the one
        before it: its tokens, stops and outputs (with `async_scheduling` off: run one step and process it).
        Returns the outputs of requests that moved."""
        if not self.config.async_scheduling:
            dispatched = self._dispatch()
            return [] if dispatched is None else self._process(dispatched)
        if self._in_flight is None:
            self._in_flight = self._dispatch()
            if self._in_flight is None:
                return []
        current, self._in_flight = self._in_flight, self._dispatch()
        outputs = self._process(current)
        if not self.groups and self._in_flight is not None:  # a step for requests that have all finished since
            self._process(self._in_flight)
            self._in_flight = None
        return outputs

    def _dispatch(self) -> _Dispatched | None:
        """Schedule a step and start it; its requests count the K/V it computes and the tokens it samples
        (as pending) at once, so that the next step can be scheduled before this one's results are back."""
        out = self.scheduler.schedule()
        if not out.chunks:
            return None
        step = self.runner.dispatch(out)
        for chunk in out.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens + chunk.num_steps - 1
            if chunk.completes:
                chunk.request.num_pending += chunk.num_steps
        return _Dispatched(out, step)

    def _process(self, dispatched: _Dispatched) -> list[RequestOutput]:
        """Take a step's results: prompt logprobs and sampled tokens of the requests still going (a request
        finished or aborted since the step was dispatched gets nothing more)."""
        result = self.runner.fetch(dispatched.step)
        moved: dict[str, RequestGroup] = {}
        first_row = 0
        for row, chunk in enumerate(dispatched.scheduled.chunks):
            request = chunk.request
            chunk_row, first_row = first_row, first_row + chunk.num_tokens
            if request.finished:
                continue
            if result.prompt is not None and request.params.prompt_logprobs is not None and request.index == 0:
                self._record_prompt_logprobs(chunk, result.prompt, chunk_row)
            if chunk.completes:
                request.num_pending -= chunk.num_steps
                group_id = self._append(request, result, row, chunk.num_steps)
                moved[group_id] = self.groups[group_id]
        return [output for group in moved.values() if (output := self._emit(group)) is not None]

    def _append(self, request: Request, result: StepOutput, row: int, num_steps: int) -> str:
        """Give the request its sampled tokens, one per step, up to a stop (later ones are dropped, as vLLM's
        multi-step does); returns its group's id."""
        completion = self._completions[id(request)]
        for step in range(num_steps):
            token = int(result.tokens[step, row])
            top = None
            if request.params.logprobs is not None:
                top = position_logprobs(token, result.logprobs[step, row], result.ranks[step, row],
                                        result.top_ids[step, row], result.top_logprobs[step, row],
                                        request.params.logprobs, self._decode_token)
            if completion.append(token, float(result.logprobs[step, row]), top):
                self.scheduler.finish(request, request.finish_reason, request.stop_reason)
                break
        return completion.group_id

    def _record_prompt_logprobs(self, chunk: ScheduledChunk, prompt: PromptLogprobs, first_row: int) -> None:
        request = chunk.request
        for k in range(chunk.num_tokens):
            target = chunk.start + k + 1  # the prompt token this row predicts
            if target >= request.num_prompt_tokens or target != len(request.prompt_logprobs):
                continue
            row = first_row + k
            request.prompt_logprobs.append(position_logprobs(
                request.token_ids[target], prompt.token_logprobs[row], prompt.ranks[row], prompt.top_ids[row],
                prompt.top_logprobs[row], request.params.prompt_logprobs, self._decode_token))

    def _decode_token(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _emit(self, group: RequestGroup) -> RequestOutput | None:
        """The group's output in the kind its request asked for (None: nothing to say yet)."""
        kind = group.completions[0].request.params.output_kind
        finished = group.finished
        output = None if kind is RequestOutputKind.FINAL_ONLY and not finished else group.output(
            delta=kind is RequestOutputKind.DELTA)
        if finished:
            del self.groups[group.request_id]
            for completion in group.completions:
                self._completions.pop(id(completion.request), None)
        return output


def _child_seed(seed: int, index: int) -> int:
    """Distinct, reproducible seeds for the `n` completions of one request."""
    return (seed * 1_000_003 + index * 7919) % (2**32)
