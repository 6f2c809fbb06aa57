"""After each step: append sampled tokens, detokenize, apply stop conditions, and build `RequestOutput`s.

Stop rules follow vLLM: after `min_tokens` outputs, EOS (unless `ignore_eos`), a `stop_token_ids` entry or a
`stop` string ends a completion with `finish_reason="stop"` (`stop_reason` = the token id or string, None
for EOS); `max_tokens` or the model length ends it with `"length"`. A stop string is cut from the text
(kept with `include_stop_str_in_output`), also when it spans several tokens; while streaming, the last
`len(longest stop) - 1` characters are held back until they cannot start a stop string.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from jaxllm.request import Request


@dataclasses.dataclass
class Completion:
    """A `Request` with its text state."""

    request: Request
    group_id: str
    detokenizer: IncrementalDetokenizer | None
    eos_token_ids: frozenset[int]
    max_model_len: int
    text: str = ""
    sent_text: int = 0  # characters already streamed
    sent_tokens: int = 0  # output tokens already streamed

    def append(self, token: int, logprob: float, top: PositionLogprobs | None) -> bool:
        """Take one sampled token; return True if it finished the completion."""
        req, params = self.request, self.request.params
        req.token_ids.append(token)
        req.cumulative_logprob += logprob
        if top is not None:
            req.logprobs.append(top)
        if self.detokenizer is not None:
            self.text += self.detokenizer.add(token)
        can_stop = req.num_output_tokens >= params.min_tokens
        if can_stop and not params.ignore_eos and token in self.eos_token_ids:
            req.finish("stop", None)
        elif can_stop and token in params.stop_token_ids:
            req.finish("stop", token)
        elif can_stop and params.stop and self._check_stop_strings():
            pass
        elif req.num_output_tokens >= req.max_tokens or len(req.token_ids) >= self.max_model_len:
            req.finish("length")
        return req.finished

    def _check_stop_strings(self) -> bool:
        params = self.request.params
        window = max(len(s) for s in params.stop) + 16
        hits = [(self.text.find(s, max(0, len(self.text) - window)), s) for s in params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[:at + len(stop)] if params.include_stop_str_in_output else self.text[:at]
        self.request.finish("stop", stop)
        return True

    def visible_text(self) -> str:
        """The text that can be shown now: all of it once finished, else minus a possible stop-string start."""
        stop = self.request.params.stop
        if self.request.finished or not stop:
            return self.text
        hold = max(len(s) for s in stop) - 1
        return self.text[:len(self.text) - hold] if hold else self.text

    def output(self, delta: bool) -> CompletionOutput:
        req = self.request
        text = self.visible_text()
        tokens = req.output_token_ids
        logprobs = req.logprobs if req.params.logprobs is not None else None
        if delta:
            text, tokens = text[self.sent_text:], tokens[self.sent_tokens:]
            logprobs = logprobs[self.sent_tokens:] if logprobs is not None else None
            self.sent_text, self.sent_tokens = len(self.visible_text()), req.num_output_tokens
        cumulative = req.cumulative_logprob if req.params.logprobs is not None else None
        return CompletionOutput(req.index, text, list(tokens), cumulative, logprobs, req.finish_reason,
                                req.stop_reason)


@dataclasses.dataclass
class RequestGroup:
    """The `n` completions of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[Completion]

    @property
    def finished(self) -> bool:
        return all(c.request.finished for c in self.completions)

    def output(self, delta: bool = False) -> RequestOutput:
        leader = self.completions[0].request
        prompt_logprobs = leader.prompt_logprobs if leader.params.prompt_logprobs is not None else None
        outputs = [c.output(delta) for c in self.completions]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, prompt_logprobs, outputs,
                             self.finished)


def position_logprobs(token: int, logprob: float, rank: int, top_ids: np.ndarray, top_lps: np.ndarray,
                      num: int, decode) -> PositionLogprobs:
    """vLLM's per-position dict: the chosen token plus the `num` most likely, each with rank and text."""
    entries = {int(token): Logprob(float(logprob), int(rank), decode(int(token)))}
    for i, (t, lp) in enumerate(zip(top_ids[:num], top_lps[:num])):
        entries.setdefault(int(t), Logprob(float(lp), i + 1, decode(int(t))))
    return entries
