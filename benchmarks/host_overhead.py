"""Host-side cost of an engine step, measured on the CPU with a tiny random Llama so the device part is small.

1. Decode batches of 1, 16 and 256 sequences at 512 tokens of context: the wall time of `LLMEngine.step()`
   (schedule, pack, transfer, dispatch, fetch, output processing) against the time of the compiled step
   alone, replayed on the same device inputs. Their difference is the host's share of a step; "prep" is
   the part before the compiled step is called (schedule, pack, transfer). With
   multi-step decode a step yields several tokens per sequence, so the per-token figures are printed too.
2. End to end: one request, 512 prompt tokens, 128 output tokens (EOS ignored); the whole generate time
   over 128, the way docs/performance.md reports batch-1 decode.

    JAX_PLATFORMS=cpu python benchmarks/host_overhead.py [--num-scheduler-steps 8] [--batches 1 16 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm import LLM, SamplingParams  # noqa: E402
from tests.tiny_models import make_tiny  # noqa: E402

CONTEXT = 512


class StepRecorder:
    """Wraps the runner's compiled step to keep the arguments of its last call, so that call can be replayed
    on its own (donated buffers are copied first)."""

    def __init__(self, runner):
        self.runner, self.step = runner, runner._step
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.called_at = 0.0
        runner._step = self

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs, self.called_at = args, kwargs, time.perf_counter()
        return self.step(*args, **kwargs)

    def replay_ms(self, repeats: int, warm: int = 2) -> float:
        """Median time of the recorded call on copies of its inputs; each run's outputs stand in for the
        donated inputs of the next (a fresh buffer would pay for first-touch page faults)."""
        args, times = jax.tree.map(_fresh, self.args), []
        for i in range(warm + repeats):
            jax.block_until_ready(args)
            start = time.perf_counter()
            outputs = jax.block_until_ready(self.step(*args, **self.kwargs))
            times.append(time.perf_counter() - start)
            args = _refill(args, outputs)
        return 1e3 * statistics.median(times[warm:])


def _fresh(x):
    """A copy of a device array; a donated (deleted) one becomes zeros of its shape."""
    if not isinstance(x, jax.Array):
        return x
    return jnp.zeros(x.shape, x.dtype, device=x.sharding) if x.is_deleted() else x.copy()


def _refill(used, outputs):
    """`used` with each input that the call donated replaced by an output of the same shape and dtype."""
    spare = [o for o in jax.tree.leaves(outputs) if isinstance(o, jax.Array)]

    def pick(x):
        if not (isinstance(x, jax.Array) and x.is_deleted()):
            return x
        i = next(i for i, o in enumerate(spare) if o.shape == x.shape and o.dtype == x.dtype)
        return spare.pop(i)
    return jax.tree.map(pick, used)


def decode_batch(llm: LLM, recorder: StepRecorder, batch: int, steps: int) -> dict[str, float]:
    """Median step wall time and replayed device time for `batch` sequences decoding at CONTEXT tokens."""
    engine = llm.llm_engine
    rng = np.random.default_rng(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1024)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", rng.integers(0, vocab, CONTEXT).tolist(), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    times, preps, tokens = [], [], []
    for _ in range(steps):
        before = sum(r.num_output_tokens for r in engine.scheduler.running)
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        preps.append(recorder.called_at - start)
        tokens.append(sum(r.num_output_tokens for r in engine.scheduler.running) - before)
    device_ms = recorder.replay_ms(max(steps // 2, 5))
    engine.abort_request([f"b{batch}-{i}" for i in range(batch)])
    step_ms = 1e3 * statistics.median(times)
    tokens_per_seq = statistics.median(tokens) / batch
    return {"step_ms": step_ms, "prep_ms": 1e3 * statistics.median(preps), "device_ms": device_ms,
            "host_ms": step_ms - device_ms, "tokens_per_seq_per_step": tokens_per_seq,
            "host_ms_per_token": (step_ms - device_ms) / tokens_per_seq}


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
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "tiny-llama"
    make_tiny("llama", path, max_position_embeddings=2048)
    extra = {} if args.num_scheduler_steps is None else {"num_scheduler_steps": args.num_scheduler_steps}
    llm = LLM(str(path), max_model_len=2048, max_num_seqs=max(args.batches), max_num_batched_tokens=2048,
              skip_tokenizer_init=True, num_gpu_blocks_override=24_000, compilation_cache_dir=tempfile.mkdtemp(),
              **extra)
    recorder = StepRecorder(llm.llm_engine.runner)
    print(f"tiny Llama (vocab {llm.llm_engine.model_config.vocab_size}), context {CONTEXT}, "
          f"max_model_len 2048, max_num_batched_tokens 2048, {jax.devices()[0].platform}")
    print("batch | step ms | prep ms | device ms (replayed) | host ms | tokens/seq/step | host ms per token")
    for batch in args.batches:
        r = decode_batch(llm, recorder, batch, args.steps)
        print(f"{batch:5d} | {r['step_ms']:7.2f} | {r['prep_ms']:7.2f} | {r['device_ms']:20.2f} | "
              f"{r['host_ms']:7.2f} | {r['tokens_per_seq_per_step']:15.1f} | {r['host_ms_per_token']:.2f}")
    print(f"end to end, 1 request, {CONTEXT} prompt + 128 output tokens: {end_to_end_ms(llm):.2f} ms per token")


if __name__ == "__main__":
    main()
