"""Continuous batching in the style of vLLM v1: each step, give requests tokens until their computed count
catches up with their token count, under a token budget and a sequence cap.

Running requests go first, oldest first; a request whose next chunk needs pages that are not free preempts
the newest running request (its pages freed, its tokens recomputed later) until it fits. Then waiting
requests are admitted first come, first served. Long prompts are chunked by the budget. The scheduler only
moves page numbers, slots and counts; it never touches device arrays.

Each running request holds a slot in `[0, max_num_seqs)`, its row in the runner's persistent per-sequence
state, from admission until it finishes or is preempted. A batch of decodes alone can run several steps in
one call (vLLM's `num_scheduler_steps`): each request gets pages for the tokens it may still sample, up to
that many, before the call.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxllm.block_pool import BlockPool
from jaxllm.request import Request, Status


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `request`, starting at token `start`, go through the model this step. What it
    means for the request is fixed when it is scheduled (the request's counts move once it is dispatched)."""

    request: Request
    start: int
    num_tokens: int
    new: bool = False  # the request took its slot this step
    num_steps: int = 1  # decode steps this call runs for the request (more than one: a multi-step decode)
    # The chunk reaches the request's last token, so that its sample is kept.
    completes: bool = dataclasses.field(init=False)
    # The chunk's token is one the previous step sampled and the host has not received: a decode chunk of a
    # request with a pending token, whose input the step takes from the device.
    from_device: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "completes", self.start + self.num_tokens == self.request.num_tokens)
        object.__setattr__(self, "from_device", self.start >= len(self.request.token_ids))


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting queue, the running list and the block pool."""

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 num_scheduler_steps: int = 1, max_model_len: int | None = None):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_scheduler_steps = num_scheduler_steps
        self.max_model_len = max_model_len
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks, preempted = self._schedule_running(budget)
        budget -= sum(c.num_tokens for c in chunks)
        if not preempted:
            chunks += self._admit_waiting(budget)
        if self.num_scheduler_steps > 1 and not preempted and chunks and all(
                c.num_tokens == 1 and c.completes and not c.new for c in chunks):
            chunks = [self._extend(c) for c in chunks]
        return SchedulerOutput(chunks, preempted)

    def _extend(self, chunk: ScheduledChunk) -> ScheduledChunk:
        """A decode chunk running up to `num_scheduler_steps` steps, as many as the request may still sample
        and its pages can be reserved for (one step if they cannot)."""
        request = chunk.request
        steps = min(self.num_scheduler_steps, self._room(request))
        if steps <= 1 or not self._reserve(request, request.num_computed_tokens + steps):
            return chunk
        return dataclasses.replace(chunk, num_steps=steps)

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledChunk], list[Request]]:
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending and self._room(request) <= 0:  # finishes when its pending tokens arrive
                i += 1
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            while not self._reserve(request, request.num_computed_tokens + num_tokens):
                victim = self.running.pop()  # the newest; never one already scheduled (those are before i)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    return chunks, preempted
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_tokens))
            budget -= num_tokens
            i += 1
        return chunks, preempted

    def _room(self, request: Request) -> int:
        """Tokens `request` may still sample before its length limit (`max_tokens` or the model length),
        counting those already pending."""
        limit = request.num_prompt_tokens + request.max_tokens
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len)
        return limit - request.num_tokens

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        skipped: list[Request] = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting.popleft()
            if not self._leader_ready(request):
                skipped.append(request)
                continue
            self._share_leader_pages(request)
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self._reserve(request, request.num_computed_tokens + num_tokens):
                self._release(request)
                self.waiting.appendleft(request)
                break
            request.status, request.leader = Status.RUNNING, None
            request.slot = self._free_slots.pop()
            self.running.append(request)
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_tokens, new=True))
            budget -= num_tokens
        self.waiting.extendleft(reversed(skipped))
        return chunks

    @staticmethod
    def _leader_ready(request: Request) -> bool:
        """A parallel sample waits until its leader has computed the shared prompt (or gave up on it)."""
        leader = request.leader
        if leader is None:
            return True
        if leader.status is Status.RUNNING and leader.num_computed_tokens >= leader.num_prompt_tokens:
            return True
        if leader.finished:
            request.leader = None
            return True
        return False

    def _share_leader_pages(self, request: Request) -> None:
        """Take the leader's full prompt pages; the partial last page is recomputed into a page of our own."""
        leader = request.leader
        if leader is None or leader.finished:
            return
        full = (request.num_prompt_tokens - 1) // self.pool.page_size
        request.pages = self.pool.share(leader.pages[:full])
        request.num_computed_tokens = full * self.pool.page_size

    def _reserve(self, request: Request, num_tokens: int) -> bool:
        """Make `request` hold pages for `num_tokens` tokens; False (nothing taken) if too few are free."""
        needed = self.pool.pages_for(num_tokens) - len(request.pages)
        if needed > self.pool.num_free:
            return False
        if needed > 0:
            request.pages += self.pool.allocate(needed)
        return True

    def _release(self, request: Request) -> None:
        self.pool.free(request.pages)
        request.pages = []
        request.num_computed_tokens = 0
        if request.slot is not None:
            self._free_slots.append(request.slot)
            request.slot = None

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request wherever it is and free its pages."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.finish(reason, stop_reason)
