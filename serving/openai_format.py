"""Engine outputs in OpenAI's response shapes: completion and chat choices, their logprobs, usage, errors."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi.responses import JSONResponse

from jaxllm.outputs import CompletionOutput, PositionLogprobs

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error the client gets back as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "BadRequestError"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status)


@dataclasses.dataclass
class Accumulated:
    """One completion put together from streamed deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[PositionLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(token_ids: list[int], logprobs: list[PositionLogprobs], num: int,
                        text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs):
        chosen = entry[token_id]
        offsets.append(text_offset)
        text_offset += len(chosen.decoded_token or "")
        tokens.append(chosen.decoded_token)
        token_lps.append(chosen.logprob)
        ranked = sorted(entry.items(), key=lambda item: item[1].rank or 0)[:num]
        tops.append({lp.decoded_token: lp.logprob for _, lp in ranked})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], logprobs: list[PositionLogprobs], num: int) -> dict[str, Any]:
    """The chat format: one entry per token with its top alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        chosen = entry[token_id]
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None),
                        key=lambda item: item[1].rank)[:num]
        content.append({**_token_entry(chosen.decoded_token, chosen.logprob),
                        "top_logprobs": [_token_entry(lp.decoded_token, lp.logprob) for _, lp in ranked]})
    return {"content": content}


def _token_entry(token: str | None, logprob: float) -> dict[str, Any]:
    token = token or ""
    return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode("utf-8"))}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
