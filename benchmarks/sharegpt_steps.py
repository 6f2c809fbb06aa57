"""Where ShareGPT-500's time goes, measured: the `jaxllm bench throughput` workload (Llama-3.1-8B shape, random
bfloat16 weights) run through the engine while every model call's composition and the moment its results reach
the host are recorded. With async scheduling the GPU runs the next call while the host takes a call's results,
so the interval between two calls' results is the later call's GPU time where the host waited for those
results; where it did not wait, the host was the bound. Calls are grouped by what they run: prefill alone, prefill with
decodes, and decode-only calls by their number of sequences. A second, traced run of the same engine sums the
calls of each `--trace FIRST CALLS` window: GPU busy and idle time, and kernels by kind (GEMMs, attention,
copies, other XLA fusions), per call.

    python benchmarks/sharegpt_steps.py --dataset-path ../shared/workloads/sharegpt1000.json
        [--num-prompts 500] [--trace FIRST CALLS ...] [--kv-cache-dtype fp8] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
from batch_decode_timeline import kind_of
from decode_timeline import summarize, write_json
from jax.profiler import ProfileData

from jaxllm import LLM
from jaxllm.bench import throughput
from jaxllm.engine_config import KV_CACHE_DTYPES

# FLOPs a token spends in the layers' GEMMs (2 x the 7.50 B parameters outside the embedding and LM head).
LAYER_FLOP_PER_TOKEN = 2 * 7.50e9
DECODE_BUCKETS = ((128, "decode only, 128-256 sequences"), (17, "decode only, 17-127"), (2, "decode only, 2-16"),
                  (1, "decode only, 1 sequence"))


@dataclasses.dataclass(frozen=True)
class Call:
    """One model call: its decode rows, prefill tokens and decode steps; the seconds from the previous call's
    results to its own, the host's seconds waiting for its results, and the host's seconds dispatching it."""

    decodes: int
    prefill_tokens: int
    steps: int
    seconds: float
    wait: float
    dispatch: float

    @property
    def kind(self) -> str:
        if self.prefill_tokens:
            return "prefill with decodes" if self.decodes else "prefill only"
        return next(name for floor, name in DECODE_BUCKETS if self.decodes >= floor)


class CallRecorder:
    """Wraps the engine's `_dispatch`, `_process` (which takes a dispatched call's results) and the runner's
    `fetch` (the wait inside it) to record each call; `after_call[n]()` runs once the n-th call is recorded."""

    def __init__(self, engine):
        self.after_call: dict[int, Callable[[], None]] = {}
        self.reset()
        dispatch, process, fetch = engine._dispatch, engine._process, engine.runner.fetch
        dispatched_in: dict[int, float] = {}

        def timed_dispatch():
            start = time.perf_counter()
            out = dispatch()
            if out is not None:
                dispatched_in[id(out)] = time.perf_counter() - start
            return out

        def timed_fetch(step):
            start = time.perf_counter()
            out = fetch(step)
            self._wait = time.perf_counter() - start
            return out

        def recorded_process(dispatched):
            outputs = process(dispatched)
            now = time.perf_counter()
            chunks = dispatched.scheduled.chunks
            decodes = sum(1 for c in chunks if c.num_tokens == 1 and c.completes and not c.new)
            self.calls.append(Call(decodes, sum(c.num_tokens for c in chunks) - decodes,
                                   max(c.num_steps for c in chunks), now - self._last, self._wait,
                                   dispatched_in.pop(id(dispatched), 0.0)))
            self._last = now
            if len(self.calls) in self.after_call:
                self.after_call[len(self.calls)]()
            return outputs

        engine._dispatch, engine._process, engine.runner.fetch = timed_dispatch, recorded_process, timed_fetch

    def reset(self) -> None:
        """Forget the calls so far; the next call's interval starts now."""
        self.calls: list[Call] = []
        self._last, self._wait = time.perf_counter(), 0.0


def by_kind(calls: list[Call]) -> list[dict]:
    """Calls, decode steps, seconds, host waits and prefill tokens per kind of call, in a fixed order."""
    order = ["prefill only", "prefill with decodes"] + [name for _, name in DECODE_BUCKETS]
    rows = []
    for kind in order:
        mine = [c for c in calls if c.kind == kind]
        if mine:
            rows.append({"kind": kind, "calls": len(mine), "steps": sum(c.steps for c in mine),
                         "seconds": sum(c.seconds for c in mine), "wait": sum(c.wait for c in mine),
                         "dispatch": sum(c.dispatch for c in mine),
                         "prefill_tokens": sum(c.prefill_tokens for c in mine),
                         "mean_sequences": sum(c.decodes for c in mine) / len(mine)})
    return rows


def print_kinds(rows: list[dict], elapsed: float) -> None:
    print("| calls | count | decode steps | seconds | share of the run | ms per step | host waiting for results "
          "| host dispatching | mean decode rows | prefill tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kind']} | {r['calls']} | {r['steps']} | {r['seconds']:.2f} | {r['seconds'] / elapsed:.0%} "
              f"| {r['seconds'] / r['steps'] * 1e3:.2f} | {r['wait']:.2f} s | {r['dispatch']:.2f} s "
              f"| {r['mean_sequences']:.0f} | {r['prefill_tokens']} |")


def traced_run(llm: LLM, recorder: CallRecorder, prompts, params, first: int, calls: int) -> dict:
    """Run the workload again, tracing calls `first` to `first + calls`: GPU busy and idle time over the
    window, and its kernels' ms by kind, per call."""
    trace_dir = tempfile.mkdtemp()
    recorder.reset()
    recorder.after_call = {first: lambda: jax.profiler.start_trace(trace_dir), first + calls: jax.profiler.stop_trace}
    if not first:
        jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    recorder.after_call = {}
    window = recorder.calls[first:first + calls]
    summary = summarize(ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]),
                        len(window))
    kinds: dict[str, float] = {}
    for name, ms, _ in summary["top_kernels"]:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    tokens = sum(c.prefill_tokens + c.decodes * c.steps for c in window)
    gemm_s = kinds.get("gemm", 0.0) * len(window) / 1e3
    return {"first": first, "calls": len(window), "elapsed_s": elapsed, "tokens": tokens,
            "steps": sum(c.steps for c in window), "wall_ms_per_call": summary["span_ms_per_token"],
            "gpu_busy_ms_per_call": summary["gpu_busy_ms_per_token"], "ms_per_call_by_kind": kinds,
            "gaps_per_call_by_size": summary["gaps_per_token_by_size"], "longest_gaps": summary["longest_gaps"],
            "top_kernels": summary["top_kernels"], "gemm_tflops": tokens * LAYER_FLOP_PER_TOKEN / gemm_s / 1e12}


def print_traced(traced: dict) -> None:
    print(f"traced: calls {traced['first']} to {traced['first'] + traced['calls']} ({traced['steps']} decode steps, "
          f"{traced['tokens']} tokens; run {traced['elapsed_s']:.2f} s): span {traced['wall_ms_per_call']:.2f} ms a "
          f"call, GPU busy {traced['gpu_busy_ms_per_call']:.2f}; layers' GEMMs at {traced['gemm_tflops']:.0f} TFLOP/s")
    print("| kind | ms a call |\n| --- | --- |")
    for kind, ms in traced["ms_per_call_by_kind"].items():
        print(f"| {kind} | {ms:.2f} |")
    print("| idle gaps | count a call | ms a call |\n| --- | --- | --- |")
    for size, (count, ms) in traced["gaps_per_call_by_size"].items():
        print(f"| {size} | {count:.1f} | {ms:.3f} |")
    print("| longest gaps, us | kernel before | kernel after |\n| --- | --- | --- |")
    for us, before, after in traced["longest_gaps"][:8]:
        print(f"| {us:.0f} | {before[:50]} | {after[:50]} |")
    print("| kernel | ms a call | count a call |\n| --- | --- | --- |")
    for name, ms, count in traced["top_kernels"][:12]:
        print(f"| {name[:70]} | {ms:.3f} | {count:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random-weights", default="llama3-8b", help="a preset or a transformers config.json")
    parser.add_argument("--dataset-path", default="../shared/workloads/sharegpt1000.json")
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--trace", type=int, nargs=2, action="append", default=[], metavar=("FIRST", "CALLS"),
                        help="a further run traced from call FIRST for CALLS calls (repeatable)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    parser.add_argument("--output-json")
    args = parser.parse_args()
    options = {"model": None, "random_weights": args.random_weights, "dataset": "sharegpt",
               "dataset_path": Path(args.dataset_path), "num_prompts": args.num_prompts}
    llm, requests, prompts, params = throughput.workload(options, {"kv_cache_dtype": args.kv_cache_dtype})
    recorder = CallRecorder(llm.llm_engine)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    rows = by_kind(recorder.calls)
    print(f"{len(requests)} requests in {elapsed:.2f} s ({len(requests) / elapsed:.2f} req/s), "
          f"{len(recorder.calls)} calls, {sum(c.steps for c in recorder.calls)} decode steps")
    print_kinds(rows, elapsed)
    result = {"elapsed_s": elapsed, "requests_per_second": len(requests) / elapsed, "by_kind": rows,
              "calls": [dataclasses.astuple(c) for c in recorder.calls], "traced": []}
    for first, calls in args.trace:
        result["traced"].append(traced_run(llm, recorder, prompts, params, first, calls))
        print_traced(result["traced"][-1])
    write_json(args.output_json, result)


if __name__ == "__main__":
    main()
