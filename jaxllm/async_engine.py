"""`AsyncEngine`: the engine behind a server or a notebook, stepping in one background thread.

`generate(...)` is an async iterator of `RequestOutput`s (deltas by default); leaving it early (a client
hanging up, a task cancelled) aborts the request. `healthy` is True only while the step loop is alive and,
when there is work, has made progress recently.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator

from jaxllm.engine_config import EngineConfig
from jaxllm.llm_engine import LLMEngine, Prompt
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The step loop stopped; no request can be served."""


class AsyncEngine:
    """An `LLMEngine` driven by a background thread; thread-safe to call from any asyncio loop."""

    def __init__(self, engine: LLMEngine, stall_timeout_s: float = 120.0):
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._last_progress = time.monotonic()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxllm-step-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine(config))

    @property
    def healthy(self) -> bool:
        if self.error is not None or not self._thread.is_alive():
            return False
        busy = self.engine.has_unfinished_requests()
        return not busy or time.monotonic() - self._last_progress < self.stall_timeout_s

    def generate(self, prompt: Prompt, params: SamplingParams | None, request_id: str
                 ) -> AsyncIterator[RequestOutput]:
        """Queue a request now (ValueError at once if it is refused) and return the iterator of its outputs.
        Call it inside a running event loop; the outputs are delivered to that loop."""
        if self.error is not None:
            raise EngineDeadError(f"the engine step loop died: {self.error!r}")
        params = params or self.engine.default_sampling_params()
        if params.output_kind is RequestOutputKind.CUMULATIVE:
            params = params.clone(output_kind=RequestOutputKind.DELTA)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        return self._outputs(request_id, queue)

    async def _outputs(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine step loop died: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort_request(request_id)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    outputs = self.engine.step() if self.engine.has_unfinished_requests() else None
                if outputs is None:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._last_progress = time.monotonic()
                for output in outputs:
                    self._deliver(output.request_id, output)
        except BaseException as e:  # the loop must report its death, whatever killed it
            logger.exception("engine step loop died")
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, e)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)
