"""Where a batch-1 decode token's time goes on the GPU: every kernel the engine launches while generating
65 tokens after a 512-token prompt (Llama-3.1-8B shape, random bfloat16 weights; the prompt's prefill, then 64
decode steps), recorded with CUPTI and summed by kernel name (per decode token, the prefill's kernels included),
against the wall times of the same request: its time per output token after the first (`tpot`, vLLM's TPOT),
its time to the first token, and its whole latency over 64 tokens (`per_token`, what these scripts reported
through session 14).

    python benchmarks/profile_decode.py [--num-scheduler-steps N] [--max-num-batched-tokens N]
        [--max-num-seqs N] [--output-json PATH]

Smaller `--max-num-batched-tokens` / `--max-num-seqs` compile fewer buckets (a batch-1 decode uses the
smallest); `benchmarks/decode_xla_flags.py` runs this script under several `XLA_FLAGS`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from typing import Callable, Iterable

import numpy as np
from jax.experimental.mosaic.gpu import profiler

from jaxllm import LLM, SamplingParams
from jaxllm.bench.presets import random_weights_dir

TOKENS = 64


def cupti_kernels(fn) -> list[tuple[str, float]]:
    """(kernel name, ms) of every kernel `fn` launches, from CUPTI (Mosaic GPU's binding; `profiler.measure`
    would jit `fn`, and the engine is not a jittable function)."""
    ext = profiler.mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    try:
        fn()
    finally:
        kernels = ext._cupti_get_timings(True)
    return kernels


@dataclasses.dataclass(frozen=True)
class DecodeTimes:
    """Wall times of one warm batch-1 request (`TOKENS + 1` tokens after a 512-token prompt), in ms.

    `per_token` is the request's whole latency over `TOKENS` (the prompt's prefill included), the figure these
    scripts reported up to session 14; `tpot` is vLLM's time per output token, the latency after the first token
    over the tokens after it, which is what a decode target at a given context means; `ttft` the first token's."""

    per_token: float
    ttft: float
    tpot: float


def timed_request(llm: LLM, prompt: dict, params: SamplingParams) -> DecodeTimes:
    """Drive one request through the engine step by step, noting when its first token comes back."""
    engine = llm.llm_engine
    start, first = time.perf_counter(), None
    engine.add_request("timed", prompt, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first is None and any(out.outputs[0].token_ids for out in outputs):
            first = time.perf_counter()
    end = time.perf_counter()
    return DecodeTimes(per_token=(end - start) / TOKENS * 1e3, ttft=(first - start) * 1e3,
                       tpot=(end - first) / TOKENS * 1e3)


def decode_workload(num_scheduler_steps: int, max_num_batched_tokens: int | None = None,
                    max_num_seqs: int | None = None, quantization: str | None = None,
                    kv_cache_dtype: str = "auto",
                    attention_block_sizes: dict[str, int] | None = None,
                    prompt_len: int = 512) -> tuple[LLM, Callable[[], None], DecodeTimes]:
    """The engine and the call every decode profile looks at: generate `TOKENS + 1` tokens after a `prompt_len`-token
    prompt (the first from the prefill, then `TOKENS` decode steps). Returns the engine, the call, and its wall
    times, timed once it is warm. A longer prompt than the default 512 measures decode at long context."""
    max_model_len = max(1024, prompt_len + TOKENS + 1)
    llm = LLM(random_weights_dir("llama3-8b"), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=max_model_len,
              num_scheduler_steps=num_scheduler_steps, max_num_batched_tokens=max_num_batched_tokens,
              max_num_seqs=max_num_seqs, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
              attention_block_sizes=attention_block_sizes)
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(0, 128000, prompt_len).tolist()}
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=TOKENS + 1)

    def run() -> None:
        llm.generate([prompt], params, use_tqdm=False)

    run()  # warm: every program used below is compiled
    return llm, run, timed_request(llm, prompt, params)


def by_name(kernels: Iterable[tuple[str, float]]) -> tuple[collections.Counter, collections.Counter]:
    """Total time and count of each kernel name (cut to 90 characters)."""
    totals, counts = collections.Counter(), collections.Counter()
    for name, time_taken in kernels:
        totals[name[:90]] += time_taken
        counts[name[:90]] += 1
    return totals, counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-scheduler-steps", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    start = time.perf_counter()
    llm, run, times = decode_workload(args.num_scheduler_steps, args.max_num_batched_tokens, args.max_num_seqs)
    ready_s = time.perf_counter() - start
    print(f"engine ready and warm in {ready_s:.1f} s (random weights, every bucket compiled)")
    kernels = cupti_kernels(run)
    totals, counts = by_name(kernels)
    gpu_ms = sum(totals.values())
    print(f"num_scheduler_steps={args.num_scheduler_steps}: TPOT {times.tpot:.2f} ms (TTFT {times.ttft:.1f} ms; "
          f"latency over {TOKENS} tokens {times.per_token:.2f} ms/token), "
          f"GPU busy {gpu_ms / TOKENS:.2f} ms/token, {len(kernels) / TOKENS:.0f} kernels/token")
    print("| kernel | ms/token | launches/token |")
    print("| --- | --- | --- |")
    for name, ms in totals.most_common(18):
        print(f"| {name} | {ms / TOKENS:.3f} | {counts[name] / TOKENS:.1f} |")
    if args.output_json:
        summary = {"wall_ms_per_token": times.per_token, "tpot_ms": times.tpot, "ttft_ms": times.ttft,
                   "gpu_busy_ms_per_token": gpu_ms / TOKENS,
                   "kernels_per_token": len(kernels) / TOKENS, "engine_ready_s": ready_s,
                   "top_kernels": {n: [ms / TOKENS, counts[n] / TOKENS] for n, ms in totals.most_common(18)}}
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
