"""jaxllm against Hugging Face transformers' continuous batching, on one GPU, in one run.

The first N ShareGPT requests (default 500) with a Llama-3.1-8B-shaped model and random bfloat16 weights,
each request generating exactly its output length (EOS ignored). transformers runs `paged|sdpa` attention
through its continuous-batching manager with per-request `max_new_tokens` (greedy); jaxllm runs
`jaxllm bench throughput --random-weights llama3-8b` (temperature 1). Each side runs in its own process
so that neither allocator starves the other. Prints both and the ratio.

    python benchmarks/gpu_side_by_side.py [--num-prompts 500] [--dataset-path PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def transformers_side(dataset_path: str, num_prompts: int) -> dict:
    import torch
    import transformers

    from jaxllm.bench.datasets import sharegpt
    from jaxllm.bench.presets import PRESETS

    requests = sharegpt(num_prompts, Path(dataset_path) if dataset_path else None)
    config = transformers.LlamaConfig(**{k: v for k, v in PRESETS["llama3-8b"].items() if k != "architectures"})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="paged|sdpa").eval()
    generation = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                               max_new_tokens=max(r.output_len for r in requests))
    start = time.perf_counter()
    with torch.no_grad(), model.continuous_batching_context_manager(generation_config=generation, block=True,
                                                                    timeout=5) as manager:
        for i, r in enumerate(requests):
            manager.add_request(r.prompt_token_ids, request_id=str(i), max_new_tokens=r.output_len)
        done, generated = 0, 0
        while done < len(requests):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
                generated += len(result.generated_tokens)
    elapsed = time.perf_counter() - start
    return {"requests_per_second": len(requests) / elapsed, "output_tokens_per_second": generated / elapsed,
            "elapsed_time": elapsed, "output_tokens": generated}


def jaxllm_side(dataset_path: str, num_prompts: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "jaxllm.json"
    command = [sys.executable, "-m", "jaxllm.cli", "bench", "throughput", "--random-weights", "llama3-8b",
               "--num-prompts", str(num_prompts), "--output-json", str(out)]
    if dataset_path:
        command += ["--dataset-path", dataset_path]
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--dataset-path", default="")
    parser.add_argument("--side", choices=["transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "transformers":
        print(json.dumps(transformers_side(args.dataset_path, args.num_prompts)))
        return
    peer_run = subprocess.run([sys.executable, __file__, "--side", "transformers", "--num-prompts",
                               str(args.num_prompts), "--dataset-path", args.dataset_path],
                              cwd=ROOT, check=True, capture_output=True, text=True)
    peer = json.loads(peer_run.stdout.strip().splitlines()[-1])
    print(f"transformers: {peer['requests_per_second']:.2f} req/s, {peer['output_tokens_per_second']:.0f} output tok/s",
          flush=True)
    ours = jaxllm_side(args.dataset_path, args.num_prompts)
    print("| engine | requests/s | output tokens/s |")
    print("| --- | --- | --- |")
    print(f"| transformers (paged|sdpa, continuous batching) | {peer['requests_per_second']:.2f} | "
          f"{peer['output_tokens_per_second']:.0f} |")
    print(f"| jaxllm | {ours['requests_per_second']:.2f} | {ours['output_tokens_per_second']:.0f} |")
    print(f"| ratio jaxllm / transformers | {ours['requests_per_second'] / peer['requests_per_second']:.2f} | |")


if __name__ == "__main__":
    main()
