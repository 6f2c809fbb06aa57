"""Issue 7's engine figures in one run: ShareGPT-500 throughput, batch-1 decode at 512 tokens of context and
start-up (cold and warm compilation cache), Llama-3.1-8B shape with random bfloat16 weights.

Each figure is one `jaxllm bench throughput` process; start-up is its wall time minus its generate time.

    python benchmarks/engine_figures.py --dataset-path ../shared/workloads/sharegpt1000.json [--extra ARGS]
        [--output-json PATH] [--compilation-cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench(args: list[str], cache_dir: str) -> dict:
    """Run `jaxllm bench throughput ARGS`; its JSON result, the process's wall time and the engine's own
    start-up line (how long loading, compiling and warm-up took)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "jaxllm.cli", "bench", "throughput", "--random-weights", "llama3-8b",
                   "--compilation-cache-dir", cache_dir, "--output-json", out.name, *args]
        start = time.perf_counter()
        done = subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        result = json.loads(Path(out.name).read_text())
    ready = [line.split(": ", 1)[1] for line in done.stderr.splitlines() if "engine ready in" in line]
    return {**result, "wall_s": wall, "engine_ready": ready[0] if ready else None, "command": shlex.join(command[2:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-path", default=None)
    parser.add_argument("--extra", default="", help="more engine flags for every run")
    parser.add_argument("--output-json", help="also write every run's result here")
    parser.add_argument("--compilation-cache-dir", help="an empty directory for the cache (default: a new temporary "
                        "one), to reuse it in later runs")
    args = parser.parse_args()
    extra = shlex.split(args.extra)
    cache = args.compilation_cache_dir or tempfile.mkdtemp(prefix="jaxllm-xla-")
    batch1 = ["--dataset", "random", "--num-prompts", "1", "--input-len", "512", "--output-len", "256", *extra]
    cold = bench(batch1, cache)
    warm = bench(batch1, cache)
    sharegpt = ["--num-prompts", "500", *extra] + (["--dataset-path", args.dataset_path] if args.dataset_path else [])
    share = bench(sharegpt, cache)
    rows = [
        ("ShareGPT-500 requests/s", f"{share['requests_per_second']:.2f}", share["command"]),
        ("ShareGPT-500 output tokens/s", f"{share['output_tokens_per_second']:.0f}", share["command"]),
        ("batch-1 decode, 512 context (ms/token)", f"{warm['elapsed_time'] / 256 * 1e3:.2f}", warm["command"]),
        ("start-up, warm cache (s)", f"{warm['wall_s'] - warm['elapsed_time']:.1f}", warm["command"]),
        ("start-up, cold cache (s)", f"{cold['wall_s'] - cold['elapsed_time']:.1f}", cold["command"]),
    ]
    for name, value, command in rows:
        print(f"| {name} | {value} | `{command}` |")
    for name, run in (("cold", cold), ("warm", warm), ("sharegpt", share)):
        print(f"{name}: {run['engine_ready']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"cold": cold, "warm": warm, "sharegpt": share}, indent=2))


if __name__ == "__main__":
    main()
