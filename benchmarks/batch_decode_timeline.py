"""Where a decode step's time goes at a ShareGPT-like batch: `--batch` sequences of `--prompt-len` random
tokens (Llama-3.1-8B shape, random bfloat16 weights, the engine's default buckets) are prefilled, then
`--calls` engine steps of pure decode are timed and traced with `jax.profiler`. Reports ms per decode step
(every sequence gains one token), the host's time per step in the engine's phases (dispatch, waiting for
results, processing them), GPU busy time, the time of each kind of kernel (GEMMs, the attention
kernel, copies, the other XLA fusions) and the idle gaps, as `decode_timeline.py` does for batch 1.

    python benchmarks/batch_decode_timeline.py [--batch 256] [--prompt-len 448] [--max-model-len 1024]
        [--max-num-seqs N] [--calls 8] [--num-scheduler-steps 8] [--block-kv N] [--num-stages N]
        [--random-weights llama3-8b]
        [--top-p P] [--top-k K] [--logprobs N] [--quantization fp8] [--kv-cache-dtype fp8]
        [--profile-host PATH] [--output-json PATH]

`--top-p`, `--top-k` and `--logprobs` give every request those sampling settings (a batch that filters or
wants logprobs runs the full sampler program: `sampling.SamplerKind`).

The cost model of `sharegpt_step_model.py` charges such a step the weights, a fixed overhead and every
sequence's KV context; this measures those parts.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import pstats
import tempfile
import time

import jax
import numpy as np
from decode_timeline import print_top, summarize, write_json
from jax.profiler import ProfileData

from jaxllm import LLM, SamplingParams
from jaxllm.bench.presets import random_weights_dir
from jaxllm.engine_config import KV_CACHE_DTYPES

KINDS = (("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma")), ("attention", ("mosaic",)),
         ("copy", ("memcpy", "Memcpy")))


def kind_of(name: str) -> str:
    """GEMM, attention, copy or other (XLA's fusions: norms, rotary, the K/V write, sampling...)."""
    return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "other")


class HostTimes:
    """Seconds the host spends in the engine's phases: scheduling and dispatching a step (and of that,
    writing its new pages into the device page table), waiting for a step's results, and processing them
    (the rest of `_process`)."""

    def __init__(self, engine):
        self.seconds = {"dispatch": 0.0, "page_updates": 0.0, "fetch_wait": 0.0, "process": 0.0}
        self.on = False
        self._wrap(engine, "_dispatch", "dispatch")
        self._wrap(engine.runner, "_write_pages", "page_updates")
        self._wrap(engine.runner, "fetch", "fetch_wait")
        self._wrap(engine, "_process", "process")

    def _wrap(self, owner, method: str, phase: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[phase] += time.perf_counter() - start

        setattr(owner, method, timed)

    def per_step_ms(self, steps: int) -> dict[str, float]:
        own = dict(self.seconds, process=self.seconds["process"] - self.seconds["fetch_wait"])
        return {phase: s / steps * 1e3 for phase, s in own.items()}


def tokens_of(engine, ids: list[str]) -> dict[str, int]:
    """Output tokens the host has received for each request."""
    live = {r.request_id: r for r in [*engine.scheduler.running, *engine.scheduler.waiting]}
    return {i: live[i].num_output_tokens for i in ids}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random-weights", default="llama3-8b", help="a preset or a transformers config.json")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=448)
    parser.add_argument("--calls", type=int, default=8, help="engine steps traced once every prompt is in")
    parser.add_argument("--max-model-len", type=int, default=1024, help="room for --prompt-len and the window")
    parser.add_argument("--max-num-seqs", type=int, help="the engine's sequence cap (default: --batch)")
    parser.add_argument("--num-scheduler-steps", type=int, default=8)
    parser.add_argument("--block-kv", type=int, help="the attention kernel's KV tokens per pipeline step")
    parser.add_argument("--num-stages", type=int, help="the attention kernel's pipeline steps in flight")
    parser.add_argument("--num-splits", type=int, help="the attention kernel's KV splits (default: its heuristic)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--logprobs", type=int)
    parser.add_argument("--quantization", choices=["fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    parser.add_argument("--profile-host", help="write a cProfile of the untraced window here and print its top")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    blocks = {k: v for k, v in (("block_kv", args.block_kv), ("num_stages", args.num_stages),
                                ("num_splits", args.num_splits)) if v}
    llm = LLM(random_weights_dir(args.random_weights), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=args.max_model_len, num_scheduler_steps=args.num_scheduler_steps,
              max_num_seqs=args.max_num_seqs or args.batch,
              attention_block_sizes=blocks or None, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.llm_engine
    host = HostTimes(engine)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, top_p=args.top_p, top_k=args.top_k, logprobs=args.logprobs,
                            ignore_eos=True, max_tokens=args.max_model_len - args.prompt_len - 8)

    def decode_window(trace_dir: str | None, timed: bool = False,
                      profile: cProfile.Profile | None = None) -> tuple[float, int, float]:
        """Prefill a fresh batch, then run `calls` steps: (ms per decode step, steps, mean context)."""
        ids = [f"r{engine.get_num_unfinished_requests()}-{i}-{time.perf_counter_ns()}" for i in range(args.batch)]
        vocab = engine.model_config.vocab_size
        for i in ids:
            engine.add_request(i, {"prompt_token_ids": rng.integers(0, vocab, args.prompt_len).tolist()}, params)
        while min(tokens_of(engine, ids).values()) < 1:
            engine.step()
        before = tokens_of(engine, ids)
        context = np.mean([args.prompt_len + n for n in before.values()])
        host.on = timed
        start = time.perf_counter()
        if trace_dir:
            jax.profiler.start_trace(trace_dir)
        if profile:
            profile.enable()
        for _ in range(args.calls):
            engine.step()
        jax.effects_barrier()
        if profile:
            profile.disable()
        if trace_dir:
            jax.profiler.stop_trace()
        wall = time.perf_counter() - start
        host.on = False
        steps = min(after - before[i] for i, after in tokens_of(engine, ids).items())
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()
        return wall / steps * 1e3, steps, context

    decode_window(None)  # compiles every program the window uses
    profile = cProfile.Profile() if args.profile_host else None
    wall, steps, context = decode_window(None, timed=True, profile=profile)
    if profile:
        profile.dump_stats(args.profile_host)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    trace_dir = tempfile.mkdtemp()
    _, traced_steps, _ = decode_window(trace_dir)
    summary = summarize(ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]),
                        traced_steps)
    kinds: dict[str, float] = {}
    for name, ms, _ in summary["top_kernels"]:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    summary.update(wall_ms_per_step=wall, steps=steps, mean_context=context, batch=args.batch,
                   sampling=dict(top_p=args.top_p, top_k=args.top_k, logprobs=args.logprobs),
                   ms_per_step_by_kind=kinds,
                   host_ms_per_step=host.per_step_ms(steps), attention_block_sizes=blocks)
    print(f"batch {args.batch}, mean context {context:.0f}: wall {wall:.2f} ms/step untraced "
          f"({args.batch / wall * 1e3:.0f} tokens/s); traced: GPU busy {summary['gpu_busy_ms_per_token']:.2f} "
          f"ms/step, {summary['kernels_per_token']:.0f} kernels/step")
    print("host, ms/step (untraced window): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                          summary["host_ms_per_step"].items()))
    print("| kind | ms/step (top 25 kernels) |\n| --- | --- |")
    for kind, ms in kinds.items():
        print(f"| {kind} | {ms:.3f} |")
    print_top("kernel or copy", summary["top_kernels"], "step")
    print_top("host event", summary["host_events"], "step")
    write_json(args.output_json, summary)


if __name__ == "__main__":
    main()
