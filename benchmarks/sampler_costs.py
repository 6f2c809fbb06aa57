"""What each compiled sampler costs on the device: `sampling.sample` alone, on `[rows, vocab]` float32 logits
(Llama-3's 128,256 tokens by default), for each `SamplerKind` on the batches it serves: no row filtering,
every row at top-p 0.9 ("filtered"), every row at top-p 0.9 wanting logprobs, and every row at top-k 20 and
top-p 0.8 (Qwen2.5-Instruct's defaults). Each case runs `--calls` times back to back and reports ms per call,
so that a run-time `cond` that makes the host wait for the device shows up as well as the kernels' own time.

    python benchmarks/sampler_costs.py [--rows 8 64 256] [--vocab 128256] [--calls 50] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from decode_timeline import write_json

from jaxllm.sampling import SamplerKind, SamplingInputs, empty_penalty_state, sample

NUM_LOGPROBS = 20  # the engine's default max_logprobs


def sampling_inputs(rows: int, top_p: float, logprobs: bool, top_k: int = 0) -> SamplingInputs:
    """Seeded temperature-1 rows, no penalties, no bans, all at `top_p` and `top_k`."""
    def full(value, dtype):
        return jnp.full((rows,), value, dtype)
    return SamplingInputs(
        temperature=full(1.0, jnp.float32), top_p=full(top_p, jnp.float32), top_k=full(top_k, jnp.int32),
        min_p=full(0.0, jnp.float32), presence_penalty=full(0.0, jnp.float32),
        frequency_penalty=full(0.0, jnp.float32), repetition_penalty=full(1.0, jnp.float32),
        seeds=jnp.arange(rows, dtype=jnp.uint32), steps=full(0, jnp.int32), slots=jnp.arange(rows, dtype=jnp.int32),
        min_tokens=full(0, jnp.int32), banned=jnp.full((rows, 4), -1, jnp.int32),
        want_logprobs=jnp.asarray(logprobs))


def time_case(rows: int, vocab: int, kind: SamplerKind, top_p: float, logprobs: bool, calls: int,
              top_k: int = 0) -> float:
    """ms per call of the jitted sampler, `calls` calls queued back to back after a warm-up call."""
    logits = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32) * 3.0
    inp, state = sampling_inputs(rows, top_p, logprobs, top_k), empty_penalty_state(rows, vocab)
    step = jax.jit(lambda x, i, s: sample(x, i, s, NUM_LOGPROBS, kind))  # all of it: ranks unused are dropped
    jax.block_until_ready(step(logits, inp, state))
    start = time.perf_counter()
    out = [step(logits, inp, state) for _ in range(calls)]
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    cases = [(SamplerKind.PLAIN, 1.0, 0, False, "unfiltered"), (SamplerKind.RUN_TIME, 1.0, 0, False, "unfiltered"),
             (SamplerKind.TOP_P, 0.9, 0, False, "filtered"), (SamplerKind.RUN_TIME, 0.9, 0, False, "filtered"),
             (SamplerKind.FULL, 0.9, 0, True, "filtered, logprobs"),
             (SamplerKind.RUN_TIME, 0.9, 0, True, "filtered, logprobs"),
             (SamplerKind.FILTER, 0.8, 20, False, "top-k 20, top-p 0.8")]  # Qwen2.5-Instruct's defaults
    results = []
    print(f"| rows | sampler | batch | ms per call ({jax.devices()[0].device_kind}, vocab {args.vocab}) |")
    print("| --- | --- | --- | --- |")
    for rows in args.rows:
        for kind, top_p, top_k, logprobs, batch in cases:
            ms = time_case(rows, args.vocab, kind, top_p, logprobs, args.calls, top_k)
            results.append(dict(rows=rows, sampler=kind.value, batch=batch, ms=ms))
            print(f"| {rows} | {kind.value} | {batch} | {ms:.3f} |")
    write_json(args.output_json, dict(vocab=args.vocab, calls=args.calls, results=results))


if __name__ == "__main__":
    main()
