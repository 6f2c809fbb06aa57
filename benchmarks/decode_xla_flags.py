"""Batch-1 decode (Llama-3.1-8B shape, random bfloat16 weights) under several XLA GPU settings, each in its
own process: `benchmarks/decode_timeline.py` (a small engine: buckets up to 512 tokens, 16 sequences) under the
variant's `XLA_FLAGS`. Prints TPOT (ms per output token after the first), latency per token with the prompt's
prefill included (what it printed through session 14), GPU busy ms per token (kernels and copies, from a trace)
and kernels and copies per token.

XLA records CUDA graphs ("command buffers") for runs of fusions, GEMMs and custom calls by default and, by
default, updates every recorded node on every run (`ALWAYS_UPDATE`); in the layer scan each iteration's
weights sit at new addresses. The variants: command buffers off; the scan itself as one unrolled CUDA graph
(`WHILE` captured, `xla_gpu_command_buffer_unroll_loops`); and the same skipping updates of nodes whose
buffers did not move (`SKIP_TEMP`).

`default` is jaxllm's own setting (`jaxllm/xla_flags.py`: GEMMs on cuBLAS). `triton_gemm` puts XLA's Triton
GEMM fusions back: the layer scan slices each layer's weights out of the stacked arrays, and XLA copies those
slices before Triton GEMMs (about 230 copies and 9.6 ms per token on an H100), while cuBLAS reads them in place.
`dot_merger` turns XLA's dot merger back on, which concatenates each layer's q, k and v weights.
`conditional` adds `cond`s to command buffers (run on the device where every branch can be recorded).
`loops_captured` is `unrolled_graph` with XLA's default command types kept: the GEMMs on layer slices are
dynamic-slice fusions, so `unrolled_graph` could not capture the layer scan at all. `while_node` captures the
layer loop without unrolling it, as a CUDA graph conditional (while) node.
`cublaslt` runs the GEMMs through cuBLASLt, whose algorithms XLA autotunes (`cublaslt_autotune_all` at the
highest autotuning level), instead of legacy cuBLAS: the small batch-1 GEMMs reach only 1.9-2.7 TB/s.
`trace_cache_N` keeps N recorded traces per command (XLA's default is 16): a cuBLAS GEMM in a command buffer
is recorded by tracing it, once per set of buffer addresses, and the layer scan gives each GEMM 32.

    python benchmarks/decode_xla_flags.py [--variants default off ...] [--timeout 240] [--dump-hlo-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CAPTURE_LOOPS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL"
# XLA's default command types and more: the GEMMs on layer slices are dynamic-slice fusions, which a command
# buffer takes only with DYNAMIC_SLICE_FUSION, so without it (CAPTURE_LOOPS) no layer scan can be captured.
DEFAULT_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"
UNROLL = "--xla_gpu_command_buffer_unroll_loops=true"
VARIANTS = {
    "default": "",
    "off": "--xla_gpu_enable_command_buffer=",
    "unrolled_graph": f"{CAPTURE_LOOPS} {UNROLL}",
    "unrolled_graph_skip_temp": f"{CAPTURE_LOOPS} {UNROLL} --xla_gpu_command_buffer_update_mode=SKIP_TEMP",
    "triton_gemm": "--xla_gpu_enable_triton_gemm=true",
    "dot_merger": "--xla_disable_hlo_passes=",
    "conditional": f"--xla_gpu_enable_command_buffer={DEFAULT_TYPES},CONDITIONAL",
    "loops_captured": f"--xla_gpu_enable_command_buffer={DEFAULT_TYPES},WHILE,CONDITIONAL {UNROLL}",
    "loops_captured_skip_temp": f"--xla_gpu_enable_command_buffer={DEFAULT_TYPES},WHILE,CONDITIONAL {UNROLL} "
                                "--xla_gpu_command_buffer_update_mode=SKIP_TEMP",
    "while_node": f"--xla_gpu_enable_command_buffer={DEFAULT_TYPES},WHILE,CONDITIONAL",
    "trace_cache_64": "--xla_cmd_buffer_trace_cache_size=64",
    "trace_cache_256": "--xla_cmd_buffer_trace_cache_size=256",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "cublaslt_autotune_all": "--xla_gpu_enable_cublaslt=true --xla_gpu_autotune_level=5",
}
TIMELINE = Path(__file__).resolve().parent / "decode_timeline.py"


def run(name: str, flags: str, timeout: float, hlo_dir: str | None) -> dict:
    """One variant in a fresh process; its summary, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        command = [sys.executable, str(TIMELINE), "--output-json", str(out)]
        if hlo_dir:
            command += ["--dump-hlo", str(Path(hlo_dir) / f"{name}.hlo.txt")]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        if done.returncode != 0 or not out.exists():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return {"error": " / ".join(lines[-3:]) if lines else f"exit {done.returncode}"}
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--output-json")
    parser.add_argument("--dump-hlo-dir", help="write each variant's optimized decode HLO here")
    args = parser.parse_args()
    results = {}
    print("| variant | TPOT ms | latency ms/token (prefill included) | GPU busy ms/token | kernels and copies/token |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.variants:
        r = results[name] = run(name, VARIANTS[name], args.timeout, args.dump_hlo_dir)
        if "error" in r:
            print(f"| {name} | {r['error'][-400:]} | | | |", flush=True)
        else:
            print(f"| {name} | {r['tpot_ms']:.2f} | {r['wall_ms_per_token']:.2f} | {r['gpu_busy_ms_per_token']:.2f} | "
                  f"{r['kernels_per_token']:.0f} |", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"flags": VARIANTS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
