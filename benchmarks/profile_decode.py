"""Where a batch-1 decode token's time goes on the GPU: every kernel the engine launches while generating
64 tokens after a 512-token prompt (Llama-3.1-8B shape, random bfloat16 weights), recorded with CUPTI and
summed by kernel name, against the wall time of the same generate call.

    python benchmarks/profile_decode.py [--num-scheduler-steps N] [--max-num-batched-tokens N]
        [--max-num-seqs N] [--output-json PATH]

Smaller `--max-num-batched-tokens` / `--max-num-seqs` compile fewer buckets (a batch-1 decode uses the
smallest); `benchmarks/decode_xla_flags.py` runs this script under several `XLA_FLAGS`.
"""

from __future__ import annotations

import argparse
import collections
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


def decode_workload(num_scheduler_steps: int, max_num_batched_tokens: int | None = None,
                    max_num_seqs: int | None = None, quantization: str | None = None,
                    kv_cache_dtype: str = "auto") -> tuple[LLM, Callable[[], None], float]:
    """The engine and the call every decode profile looks at: generate TOKENS tokens after a 512-token
    prompt. Returns the engine, the call, and its wall time in ms per token, timed once it is warm."""
    llm = LLM(random_weights_dir("llama3-8b"), load_format="dummy", skip_tokenizer_init=True, max_model_len=1024,
              num_scheduler_steps=num_scheduler_steps, max_num_batched_tokens=max_num_batched_tokens,
              max_num_seqs=max_num_seqs, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    prompt = [{"prompt_token_ids": np.random.default_rng(0).integers(0, 128000, 512).tolist()}]
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=TOKENS)

    def run() -> None:
        llm.generate(prompt, params, use_tqdm=False)

    run()  # warm: every program used below is compiled
    start = time.perf_counter()
    run()
    return llm, run, (time.perf_counter() - start) / TOKENS * 1e3


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
    llm, run, wall_ms = decode_workload(args.num_scheduler_steps, args.max_num_batched_tokens, args.max_num_seqs)
    ready_s = time.perf_counter() - start
    print(f"engine ready and warm in {ready_s:.1f} s (random weights, every bucket compiled)")
    kernels = cupti_kernels(run)
    totals, counts = by_name(kernels)
    gpu_ms = sum(totals.values())
    print(f"num_scheduler_steps={args.num_scheduler_steps}: wall {wall_ms:.2f} ms/token, "
          f"GPU busy {gpu_ms / TOKENS:.2f} ms/token, {len(kernels) / TOKENS:.0f} kernels/token")
    print("| kernel | ms/token | launches/token |")
    print("| --- | --- | --- |")
    for name, ms in totals.most_common(18):
        print(f"| {name} | {ms / TOKENS:.3f} | {counts[name] / TOKENS:.1f} |")
    if args.output_json:
        summary = {"wall_ms_per_token": wall_ms, "gpu_busy_ms_per_token": gpu_ms / TOKENS,
                   "kernels_per_token": len(kernels) / TOKENS, "engine_ready_s": ready_s,
                   "top_kernels": {n: [ms / TOKENS, counts[n] / TOKENS] for n, ms in totals.most_common(18)}}
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
