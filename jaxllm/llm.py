"""`LLM`: vLLM's offline API. `LLM(model).generate(prompts, sampling_params)` and `.chat(messages)`."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from jaxllm import distributed
from jaxllm.engine_config import EngineConfig
from jaxllm.llm_engine import LLMEngine, Prompt
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """A model ready to generate; every keyword is an `EngineConfig` field (vLLM's names).

    Multi-host: run the same script on every process. On process 0 `LLM(...)` returns and generates; on the
    others it runs process 0's steps and, when process 0 exits, ends the program (SystemExit 0)."""

    def __init__(self, model: str = "SmolLM2-135M-Instruct", tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None, block_size: int = 16,
                 seed: int = 0, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 skip_tokenizer_init: bool = False, **kwargs: Any):
        self.llm_engine = LLMEngine(EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, seed=seed,
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            skip_tokenizer_init=skip_tokenizer_init, **kwargs))
        self._counter = itertools.count()
        if not distributed.is_leader():
            self.llm_engine.follow()
            raise SystemExit(0)

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = self._params_for(len(prompts), sampling_params)
        return self._run(list(prompts), params, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools, tokenize=False)
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_for(self, count: int, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"{len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [str(next(self._counter)) for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                engine.add_request(request_id, prompt, p.clone(output_kind=RequestOutputKind.FINAL_ONLY))
        except Exception:
            engine.abort_request(ids)  # nothing half-queued stays behind
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                for output in engine.step():
                    finished[output.request_id] = output
                    bar.update(1)
        return [finished[i] for i in ids]
