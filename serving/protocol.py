"""Request bodies of the OpenAI-compatible API (with vLLM's sampling extras) and their sampling params.

Fields OpenAI defines but jaxllm does not implement are refused with a 400 naming them, rather than
silently ignored; fields nobody defines are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxllm.sampling_params import RequestOutputKind, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Sampling fields shared by completions and chat (OpenAI's, then vLLM's extras)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    # defined by OpenAI, not implemented here: refused when set
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        """The first field that is set but not implemented, if any."""
        if self.logit_bias:
            return "logit_bias"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return None

    def sampling_params(self, defaults: SamplingParams, max_tokens: int | None, logprobs: int | None
                        ) -> SamplingParams:
        """vLLM's rule: what the request sets wins, then the model's generation_config, then the defaults.
        `max_tokens=None` means the rest of the model's context."""
        chosen = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty") if getattr(self, name) is not None}
        values = {**vars(defaults), **chosen, "max_tokens": max_tokens}
        return SamplingParams(**{
            **values, "n": self.n, "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0, "seed": self.seed, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens,
            "logprobs": logprobs, "prompt_logprobs": self.prompt_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            # The server always streams from the engine (metrics per token, disconnects noticed early).
            "output_kind": RequestOutputKind.DELTA})


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        return "suffix" if self.suffix is not None else super().unsupported()


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> str | None:
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            return "tool_choice"
        return super().unsupported()


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
