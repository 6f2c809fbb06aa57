"""What `--quantization fp8` and `--kv-cache-dtype fp8` do to a real model's predictions: the mean negative
log-likelihood per token of ShareGPT prompts (in the model's own tokens, teacher-forced: the engine's
`prompt_logprobs`, whose prefill attends over the cache as written) with the model's own weights and cache and
with each 8-bit setting, and how often each agrees with the first on the most likely next token. Runs anywhere
(CPU included), by default on SmolLM2-135M-Instruct.

    python benchmarks/fp8_quality.py [--model NAME] [--num-prompts 50] [--dataset-path .../sharegpt1000.json]
        [--settings base weights kv kv_e5m2 both]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxllm import LLM, SamplingParams
from jaxllm.bench.datasets import sharegpt

SETTINGS = {  # name: (row label, engine arguments)
    "base": ("the model's dtype", {}),
    "weights": ("fp8 projections", {"quantization": "fp8"}),
    "kv": ("fp8 KV cache (e4m3)", {"kv_cache_dtype": "fp8"}),
    "kv_e5m2": ("fp8 KV cache (e5m2)", {"kv_cache_dtype": "fp8_e5m2"}),
    "both": ("fp8 projections and KV cache", {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
}


def prompt_scores(llm: LLM, prompts: list[list[int]]) -> tuple[np.ndarray, list]:
    """Each prompt token's log-probability (after the first) and each position's most likely token."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0), use_tqdm=False)
    logprobs, best = [], []
    for prompt, out in zip(prompts, outs):
        for token, position in zip(prompt[1:], out.prompt_logprobs[1:]):
            logprobs.append(position[token].logprob)
            best.append(min(position, key=lambda t: position[t].rank))
    return np.asarray(logprobs), best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--dataset-path", type=Path, help="the ShareGPT workload JSON (default: ../shared's)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["base", "weights", "kv"],
                        help="the first is the baseline the others are compared with")
    args = parser.parse_args()
    scores, prompts = {}, None
    for name in args.settings:
        llm = LLM(args.model, max_model_len=2048, **SETTINGS[name][1])
        if prompts is None:  # the prompts in the model's own tokens
            requests = sharegpt(args.num_prompts, args.dataset_path, llm.get_tokenizer())
            prompts = [r.prompt_token_ids[:1024] for r in requests]
        scores[name] = prompt_scores(llm, prompts)
        del llm
    base_best = scores[args.settings[0]][1]
    print(f"{args.model}, {len(prompts)} ShareGPT prompts, {len(base_best)} tokens scored")
    print("| setting | mean NLL per token | perplexity | most likely next token as the first's |")
    print("| --- | --- | --- | --- |")
    for name, (logprobs, best) in scores.items():
        agree = np.mean([a == b for a, b in zip(base_best, best)])
        print(f"| {SETTINGS[name][0]} | {-logprobs.mean():.4f} | {np.exp(-logprobs.mean()):.3f} | {agree:.1%} |")


if __name__ == "__main__":
    main()
