"""Prometheus metrics under vLLM's names with the `jaxllm:` prefix and a `model_name` label.

Counters and histograms are fed by the server as requests stream; queue lengths, KV-cache usage and
preemptions are read from the engine at scrape time.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxllm.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    """Gauges read from the scheduler when Prometheus scrapes."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        scheduler = self.engine.scheduler
        values = (("jaxllm:num_requests_running", "Requests in the running batch.", len(scheduler.running)),
                  ("jaxllm:num_requests_waiting", "Requests waiting to be scheduled.", len(scheduler.waiting)),
                  ("jaxllm:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full).",
                   scheduler.pool.usage))
        for name, doc, value in values:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        preemptions = CounterMetricFamily("jaxllm:num_preemptions", "Requests preempted (pages freed, recomputed).",
                                          labels=["model_name"])
        preemptions.add_metric([self.model_name], scheduler.num_preemptions)
        yield preemptions


class ServerMetrics:
    """The metrics of one server; `RequestTimer` feeds them per request."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("jaxllm:generation_tokens", "Generated tokens.", labels,
                                         registry=self.registry)
        self.request_success = Counter("jaxllm:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("jaxllm:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, model_name))

    def timer(self, num_prompt_tokens: int) -> "RequestTimer":
        return RequestTimer(self, num_prompt_tokens)


class RequestTimer:
    """Observes one request: first token, tokens after it, the end."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self.metrics, self.start = metrics, time.monotonic()
        self.last_token: float | None = None
        metrics.prompt_tokens.labels(metrics.model_name).inc(num_prompt_tokens)

    def tokens(self, count: int) -> None:
        """`count` output tokens (summed over the request's completions) arrived now."""
        if count <= 0:
            return
        now, m = time.monotonic(), self.metrics
        m.generation_tokens.labels(m.model_name).inc(count)
        if self.last_token is None:
            m.ttft.labels(m.model_name).observe(now - self.start)
        else:
            gap = (now - self.last_token) / count
            for _ in range(count):
                m.itl.labels(m.model_name).observe(gap)
        self.last_token = now

    def finished(self, reasons: list[str | None]) -> None:
        m = self.metrics
        m.e2e.labels(m.model_name).observe(time.monotonic() - self.start)
        for reason in reasons:
            m.request_success.labels(m.model_name, reason or "abort").inc()
