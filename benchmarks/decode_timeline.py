"""Where batch-1 decode's wall time goes between GPU kernels: a `jax.profiler` trace of one generate call
(65 tokens after a 512-token prompt, or `--prompt-len`, Llama-3.1-8B shape, random bfloat16 weights), read back with
`jax.profiler.ProfileData`. Reports the untraced request's TPOT (time per output token after the first, vLLM's
measure), TTFT and latency per token (prefill included), then, per decode token with the prefill's kernels
spread over them, GPU busy time (the union of kernel intervals), the busiest kernels and
copies, the idle gaps between kernels by size with the kernels on either side of the longest ones, and one
decoder layer's kernels in order (from one Mosaic GPU kernel to the next: with bfloat16 weights the attention
kernel, so a whole layer; with `--quantization fp8` the FP8 GEMMs are Mosaic kernels too, so a part of one)
with the idle time before each. The workload is `profile_decode.py`'s (`decode_workload`).

    python benchmarks/decode_timeline.py [--num-scheduler-steps N] [--quantization fp8] [--kv-cache-dtype fp8]
        [--num-splits N] [--prompt-len N] [--output-json PATH] [--dump-hlo PATH]

GPU busy here counts copies as well as kernels (CUPTI kernel records, as in `profile_decode.py`, miss copies
made with `cudaMemcpyAsync`). `--dump-hlo` writes the optimized HLO of the smallest multi-step decode program.
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile

import jax
import numpy as np
from jax.profiler import ProfileData
from profile_decode import TOKENS, by_name, decode_workload

from jaxllm.engine_config import KV_CACHE_DTYPES
from jaxllm.sampling import SamplerKind

GAP_EDGES_US = (5, 20, 100, 1000)


def gpu_kernels(data: ProfileData) -> list[tuple[float, float, str]]:
    """(start ns, end ns, name) of every kernel or copy on the first GPU's streams, in time order."""
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name:
                continue
            out += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
    return sorted(out)


def host_events(data: ProfileData, steps: int) -> list[list]:
    """[name, ms per step, count per step] of the host's traced events (XLA's thunks, JAX's dispatch), the
    longest first: where the host waits on the device shows up here."""
    totals, counts = by_name((e.name, e.duration_ns) for plane in data.planes if plane.name.startswith("/host")
                             for line in plane.lines for e in line.events)
    return [[n, ns / 1e6 / steps, counts[n] / steps] for n, ns in totals.most_common(20)]


def gaps(kernels: list[tuple[float, float, str]]) -> tuple[float, list[tuple[float, str, str]]]:
    """GPU busy ns (the union of the intervals) and each idle gap: (ns, kernel before, kernel after)."""
    busy, idle = 0.0, []
    end, last = kernels[0][0], kernels[0][2]
    for start, stop, name in kernels:
        if start > end:
            idle.append((start - end, last, name))
        if stop > end:
            busy += stop - max(start, end)
            end, last = stop, name
    return busy, idle


def layer_sequence(kernels: list[tuple[float, float, str]], marker: str = "mosaic_gpu") -> list[list]:
    """[name, us, idle us before] of each kernel or copy from just after a Mosaic GPU kernel (`marker`) in the
    middle of the trace to the next one, inclusive: one decoder layer when attention is the only Mosaic kernel."""
    marks = [i for i, (_, _, name) in enumerate(kernels) if marker in name]
    if len(marks) < 2:
        return []
    first, last = marks[len(marks) // 2 - 1], marks[len(marks) // 2]
    return [[name[:60], (stop - start) / 1e3, (start - kernels[i - 1][1]) / 1e3]
            for i, (start, stop, name) in enumerate(kernels[first + 1:last + 1], first + 1)]


def summarize(data: ProfileData, steps: int = TOKENS) -> dict:
    """The trace's figures per decode step (per token at batch 1), over `steps` steps."""
    kernels = gpu_kernels(data)
    if not kernels:
        raise SystemExit("no GPU kernels in the trace: the timelines need a GPU")
    busy, idle = gaps(kernels)
    span = kernels[-1][1] - kernels[0][0]
    sizes = np.array([g for g, _, _ in idle]) / 1e3
    edges = (0,) + GAP_EDGES_US + (float("inf"),)
    histogram = {f"{lo}-{hi} us": [int(((sizes >= lo) & (sizes < hi)).sum()) / steps,
                                   float(sizes[(sizes >= lo) & (sizes < hi)].sum()) / 1e3 / steps]
                 for lo, hi in zip(edges[:-1], edges[1:])}
    longest = sorted(idle, reverse=True)[:20]
    totals, counts = by_name((name, stop - start) for start, stop, name in kernels)
    return {"span_ms_per_token": span / 1e6 / steps, "gpu_busy_ms_per_token": busy / 1e6 / steps,
            "kernels_per_token": len(kernels) / steps,
            "gaps_per_token_by_size": histogram,
            "top_kernels": [[n, ns / 1e6 / steps, counts[n] / steps] for n, ns in totals.most_common(25)],
            "longest_gaps": [[g / 1e3, before[:80], after[:80]] for g, before, after in longest],
            "host_events": host_events(data, steps), "layer_sequence": layer_sequence(kernels)}


def print_top(what: str, rows: list[list], per: str, limit: int = 15) -> None:
    """A markdown table of `[name, ms, count]` rows (kernels or host events) per token or step."""
    print(f"| {what} | ms/{per} | per {per} |\n| --- | --- | --- |")
    for name, ms, count in rows[:limit]:
        print(f"| {name} | {ms:.3f} | {count:.1f} |")


def print_layer(sequence: list[list]) -> None:
    """`layer_sequence` as a markdown table."""
    print("| one layer: kernel or copy | us | idle us before |\n| --- | --- | --- |")
    for name, us, idle in sequence:
        print(f"| {name} | {us:.2f} | {idle:.2f} |")


def write_json(path: str | None, summary: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-scheduler-steps", type=int, default=8)
    parser.add_argument("--quantization", choices=["fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    parser.add_argument("--num-splits", type=int, help="the attention kernel's KV splits (default: its heuristic)")
    parser.add_argument("--prompt-len", type=int, default=512, help="the context decode starts from")
    parser.add_argument("--output-json")
    parser.add_argument("--dump-hlo")
    args = parser.parse_args()
    blocks = {"num_splits": args.num_splits} if args.num_splits else None
    llm, run, times = decode_workload(args.num_scheduler_steps, max_num_batched_tokens=512, max_num_seqs=16,
                                      quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                                      attention_block_sizes=blocks, prompt_len=args.prompt_len)
    if args.dump_hlo:
        runner = llm.llm_engine.runner
        key = min(k for k in runner._executables if k.num_steps > 1 and k.sampler is SamplerKind.PLAIN)
        with open(args.dump_hlo, "w") as f:
            f.write(runner._executables[key].as_text())
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        run()
    summary = summarize(ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]))
    summary.update(wall_ms_per_token=times.per_token, tpot_ms=times.tpot, ttft_ms=times.ttft)
    print(f"untraced: TPOT {times.tpot:.2f} ms, TTFT {times.ttft:.1f} ms, latency over {TOKENS} tokens "
          f"{times.per_token:.2f} ms/token; traced: span {summary['span_ms_per_token']:.2f} ms/token, "
          f"GPU busy {summary['gpu_busy_ms_per_token']:.2f}, {summary['kernels_per_token']:.0f} kernels/token")
    print("| idle gap | gaps/token | idle ms/token |\n| --- | --- | --- |")
    for size, (count, ms) in summary["gaps_per_token_by_size"].items():
        print(f"| {size} | {count:.1f} | {ms:.2f} |")
    print_top("kernel or copy", summary["top_kernels"], "token", 12)
    print_top("host event", summary["host_events"], "token")
    print_layer(summary["layer_sequence"])
    write_json(args.output_json, summary)


if __name__ == "__main__":
    main()
