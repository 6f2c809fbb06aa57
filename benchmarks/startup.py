"""Start-up to the first token (issue 7): a new process that imports jaxllm, builds the engine (Llama-3.1-8B
shape, random bfloat16 weights made on the device) and generates the first token of a 512-token prompt.
Timed from just before the process is launched until that token is back; teardown is not counted.

The runs share one compilation cache directory, in this order:
- cold: an empty cache, everything compiled;
- warm: the step cache (`jaxllm.compilation.StepCache`) loads every step variant;
- jax_cache_only: the step cache emptied, JAX's own cache kept (what a jaxllm upgrade that leaves the
  programs alone looks like): the variants are traced and lowered again, then stored;
- warm_again: loads what the previous run stored (checks that those entries run).
Each run also decodes 16 greedy tokens; they must agree across runs.

    python benchmarks/startup.py [--runs cold warm jax_cache_only warm_again] [--max-model-len N]
        [--quantization fp8] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 512


def child(cache_dir: str, max_model_len: int | None, quantization: str | None) -> None:
    """One start: the marks (seconds since the parent's launch time) and the greedy tokens, as a JSON line."""
    launched = float(os.environ["STARTUP_LAUNCHED"])
    marks = {"interpreter": time.time() - launched}
    from jaxllm import LLM, SamplingParams
    from jaxllm.bench.presets import random_weights_dir
    marks["imports"] = time.time() - launched
    llm = LLM(random_weights_dir("llama3-8b"), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=max_model_len, compilation_cache_dir=cache_dir, quantization=quantization)
    marks["engine_ready"] = time.time() - launched
    prompt = {"prompt_token_ids": [(7 * i) % 128000 for i in range(PROMPT_LEN)]}
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    marks["first_token"] = time.time() - launched
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    print("STARTUP " + json.dumps({"marks": marks, "tokens": list(greedy[0].outputs[0].token_ids)}), flush=True)
    os._exit(0)  # teardown (freeing the device) is not part of start-up


def launch(cache_dir: str, max_model_len: int | None, quantization: str | None) -> dict:
    command = [sys.executable, __file__, "--child", "--cache-dir", cache_dir]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if quantization:
        command += ["--quantization", quantization]
    env = {**os.environ, "STARTUP_LAUNCHED": repr(time.time())}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("STARTUP ")]
    if done.returncode or not lines:
        raise RuntimeError(f"start-up run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    ready = [line.split(": ", 1)[1] for line in done.stderr.splitlines() if "engine ready in" in line]
    return {**json.loads(lines[0][len("STARTUP "):]), "engine_ready": ready[0] if ready else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--runs", nargs="+", default=["cold", "warm", "jax_cache_only", "warm_again"],
                        choices=["cold", "warm", "jax_cache_only", "warm_again"])
    parser.add_argument("--max-model-len", type=int, help="default: the model's own (131072), as `jaxllm serve`")
    parser.add_argument("--quantization", choices=["fp8"])
    parser.add_argument("--output-json")
    args = parser.parse_args()
    if args.child:
        child(args.cache_dir, args.max_model_len, args.quantization)
    cache_dir = tempfile.mkdtemp(prefix="jaxllm-startup-")
    results = {}
    for run in args.runs:
        if run == "jax_cache_only":
            shutil.rmtree(Path(cache_dir) / "steps", ignore_errors=True)
        results[run] = launch(cache_dir, args.max_model_len, args.quantization)
    reference = next(iter(results.values()))["tokens"]
    print("| run | first token (s) | imports (s) | engine ready (s) | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    for run, result in results.items():
        marks = result["marks"]
        print(f"| {run} | {marks['first_token']:.1f} | {marks['imports']:.1f} | {marks['engine_ready']:.1f} | "
              f"{result['tokens'] == reference} |")
    for run, result in results.items():
        print(f"{run}: {result['engine_ready']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
