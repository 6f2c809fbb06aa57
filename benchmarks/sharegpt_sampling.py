"""ShareGPT offline throughput as `jaxllm bench throughput` measures it (Llama-3.1-8B shape, random bfloat16
weights, exact output lengths), with every request at the sampling settings given here instead of vLLM's
temperature 1 and top-p 1. A model whose generation config sets top-p (Llama-3.1-Instruct: 0.9) gets those
as its requests' defaults, so its batches filter every step.

    python benchmarks/sharegpt_sampling.py --dataset-path .../sharegpt1000.json [--top-p 0.9] [--top-k K]
        [--min-p P] [--num-prompts 500] [--output-json PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxllm.bench import throughput


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-path")
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--random-weights", default="llama3-8b")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    sampling = {"top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p}
    dataset = Path(args.dataset_path) if args.dataset_path else None
    options = {"model": None, "random_weights": args.random_weights, "dataset": "sharegpt", "dataset_path": dataset,
               "num_prompts": args.num_prompts, "sampling": sampling, "output_json": args.output_json}
    print(f"sampling: temperature 1.0, {sampling}")
    throughput.run(options, {})


if __name__ == "__main__":
    main()
