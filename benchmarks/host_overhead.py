"""Host-side cost of an engine step, measured on the CPU with a tiny random Llama so the device part is small.

1. Decode batches of 1, 16 and 256 sequences at 512 tokens of context: the wall time of `LLMEngine.step()`
   against the time of its call of the compiled step (dispatch and device execution, waited for). The
   rest is the host's share of a step: schedule, pack, transfer, fetch, output processing; "prep" is the
   part before the call (schedule, pack, transfer). With
   multi-step decode a step yields several tokens per sequence, so the per-token figures are printed too.
2. End to end: one request, 512 prompt tokens, 128 output tokens (EOS ignored); the whole generate time
   over 128, the way docs/performance.md reports batch-1 decode.

    JAX_PLATFORMS=cpu python benchmarks/host_overhead.py [--num-scheduler-steps 8] [--batches 1 16 256]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.sampling_params import RequestOutputKind  # noqa: E402
from tests.tiny_models import make_tiny  # noqa: E402

CONTEXT = 512


class StepTimer:
    """Wraps the runner's compiled steps: each call waits for its results, so that the time of the call
    (dispatch and device execution) is known and the rest of `LLMEngine.step()` is host work."""

    def __init__(self, runner):
        self.call_s, self.called_at = 0.0, 0.0
        for key, executable in runner._executables.items():
            runner._executables[key] = functools.partial(self._timed, executable)

    def _timed(self, executable, *args):
        self.called_at = time.perf_counter()
        outputs = jax.block_until_ready(executable(*args))
        self.call_s = time.perf_counter() - self.called_at
        return outputs


def decode_batch(llm: LLM, timer: StepTimer, batch: int, steps: int) -> dict[str, float]:
    """Medians over `steps` engine steps of `batch` sequences decoding at about CONTEXT tokens."""
    engine = llm.llm_engine
    rng = np.random.default_rng(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1024,
                            output_kind=RequestOutputKind.DELTA)  # what the server asks for
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", rng.integers(0, vocab, CONTEXT).tolist(), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    rows = []
    for _ in range(steps):
        before = sum(r.num_output_tokens for r in engine.scheduler.running)
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        tokens = (sum(r.num_output_tokens for r in engine.scheduler.running) - before) / batch
        rows.append((wall, timer.called_at - start, timer.call_s, tokens))
    engine.abort_request([f"b{batch}-{i}" for i in range(batch)])
    wall, prep, call, tokens = (1e3 * statistics.median(column) for column in zip(*rows))
    tokens /= 1e3
    return {"step_ms": wall, "prep_ms": prep, "call_ms": call, "host_ms": wall - call,
            "tokens_per_seq_per_step": tokens, "host_ms_per_token": (wall - call) / tokens}


def end_to_end_ms(llm: LLM, output_len: int = 128) -> float:
    vocab = llm.llm_engine.model_config.vocab_size
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(0, vocab, CONTEXT).tolist()}
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=output_len, seed=0)
    llm.generate(prompt, params, use_tqdm=False)  # warm
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        runs.append(time.perf_counter() - start)
    return 1e3 * statistics.median(runs) / output_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--num-scheduler-steps", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=2048, help="sets the page table's width")
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "tiny-llama"
    make_tiny("llama", path, max_position_embeddings=args.max_model_len)
    extra = {} if args.num_scheduler_steps is None else {"num_scheduler_steps": args.num_scheduler_steps}
    llm = LLM(str(path), max_model_len=args.max_model_len, max_num_seqs=max(args.batches), max_num_batched_tokens=2048,
              skip_tokenizer_init=True, num_gpu_blocks_override=24_000, compilation_cache_dir=tempfile.mkdtemp(),
              **extra)
    timer = StepTimer(llm.llm_engine.runner)
    print(f"tiny Llama (vocab {llm.llm_engine.model_config.vocab_size}), context {CONTEXT}, "
          f"max_model_len {args.max_model_len}, max_num_batched_tokens 2048, {jax.devices()[0].platform}")
    print("batch | step ms | prep ms | call ms | host ms | tokens/seq/step | host ms per token")
    for batch in args.batches:
        r = decode_batch(llm, timer, batch, args.steps)
        print(f"{batch:5d} | {r['step_ms']:7.2f} | {r['prep_ms']:7.2f} | {r['call_ms']:7.2f} | "
              f"{r['host_ms']:7.2f} | {r['tokens_per_seq_per_step']:15.1f} | {r['host_ms_per_token']:.2f}")
    print(f"end to end, 1 request, {CONTEXT} prompt + 128 output tokens: {end_to_end_ms(llm):.2f} ms per token")


if __name__ == "__main__":
    main()
