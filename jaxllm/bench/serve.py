"""`jaxllm bench serve`: online serving latency and throughput against any OpenAI-compatible server, like
vLLM's `benchmark_serving` (streamed `/v1/completions`, Poisson or unlimited arrivals, a concurrency cap)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import httpx
import numpy as np

from jaxllm.bench.datasets import BenchRequest, random_tokens, sharegpt


@dataclasses.dataclass
class Measured:
    """One request as the client saw it."""

    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


async def _one(client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest,
               api_key: str | None) -> Measured:
    body = {"model": model, "prompt": request.prompt if request.prompt is not None else request.prompt_token_ids,
            "max_tokens": request.output_len, "ignore_eos": True, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result, start = Measured(), time.perf_counter()
    last = start
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e, result.ok = time.perf_counter() - start, True
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _run_all(requests: list[BenchRequest], base_url: str, model: str, request_rate: float,
                   max_concurrency: int | None, api_key: str | None, seed: int) -> tuple[list[Measured], float]:
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30)) as client:
        async def limited(request: BenchRequest) -> Measured:
            async with limit:
                return await _one(client, base_url, model, request, api_key)

        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[Measured], duration: float) -> dict[str, Any]:
    """vLLM's figures: throughputs, and mean / median / p99 of TTFT, TPOT, ITL and end-to-end latency (ms)."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    summary: dict[str, Any] = {
        "duration": duration, "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration}
    series = {"ttft": [r.ttft for r in done], "e2el": [r.e2e for r in done],
              "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
              "itl": [x for r in done for x in r.itl]}
    for name, values in series.items():
        values_ms = np.asarray(values or [0.0]) * 1000
        summary[f"mean_{name}_ms"] = float(values_ms.mean())
        summary[f"median_{name}_ms"] = float(np.median(values_ms))
        summary[f"p99_{name}_ms"] = float(np.percentile(values_ms, 99))
    return summary


def run(options: dict[str, Any]) -> dict[str, Any]:
    if options["dataset"] == "random":
        requests = random_tokens(options["num_prompts"], options["input_len"], options["output_len"],
                                 options["vocab_size"], options.get("seed") or 0)
    else:
        requests = sharegpt(options["num_prompts"], options.get("dataset_path"))
    base_url = options["base_url"].rstrip("/").removesuffix("/v1")
    model = options.get("model") or httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
    results, duration = asyncio.run(_run_all(requests, base_url, model, options["request_rate"],
                                             options.get("max_concurrency"), options.get("api_key"),
                                             options.get("seed") or 0))
    summary = {"model": model, "base_url": base_url, "request_rate": options["request_rate"],
               "max_concurrency": options.get("max_concurrency"), **summarize(results, duration)}
    _print(summary)
    if options.get("output_json"):
        with open(options["output_json"], "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _print(s: dict[str, Any]) -> None:
    print(f"Successful requests: {s['completed']} (failed {s['failed']}) in {s['duration']:.2f} s")
    print(f"Request throughput: {s['request_throughput']:.2f} req/s; output {s['output_throughput']:.2f} tok/s; "
          f"total {s['total_token_throughput']:.2f} tok/s")
    for name, label in (("ttft", "Time to first token"), ("tpot", "Time per output token"),
                        ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        print(f"{label} (ms): mean {s[f'mean_{name}_ms']:.2f}, median {s[f'median_{name}_ms']:.2f}, "
              f"p99 {s[f'p99_{name}_ms']:.2f}")
