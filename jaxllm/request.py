"""One sequence being generated: its tokens, how many of them are in the KV cache, and its pages."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxllm.outputs import PositionLogprobs
from jaxllm.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """A sequence of the scheduler. For `n > 1` each completion is its own `Request` (`index` 0..n-1);
    siblings wait for the first (`leader`) to compute the prompt, then share its full prompt pages.

    Invariant: `num_computed_tokens <= num_tokens`; the first `num_computed_tokens` tokens have their K/V in
    `pages` (or will have, once the steps already dispatched have run). `num_tokens` counts the `num_pending`
    tokens sampled by a dispatched step whose values the host has not received yet (the engine schedules the
    next step before the previous one's results come back).
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int
    index: int = 0
    leader: "Request | None" = None
    min_tokens_banned: list[int] = dataclasses.field(default_factory=list)  # EOS and stop ids
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_pending: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None  # the request's row in the runner's per-sequence state while it runs
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens known to the host plus those sampled on the device and not yet received."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason
