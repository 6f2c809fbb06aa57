"""What `--quantization fp8` does to a real model's predictions: the mean negative log-likelihood per token of
ShareGPT prompts (in the model's own tokens, teacher-forced: the engine's `prompt_logprobs`) with the model's
own weights and with FP8 projections, and how often the two agree on the most likely next token. Runs anywhere
(CPU included), by default on SmolLM2-135M-Instruct.

    python benchmarks/fp8_quality.py [--model NAME] [--num-prompts 50] [--dataset-path .../sharegpt1000.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxllm import LLM, SamplingParams
from jaxllm.bench.datasets import sharegpt


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
    args = parser.parse_args()
    scores, prompts = {}, None
    for quantization in (None, "fp8"):
        llm = LLM(args.model, quantization=quantization, max_model_len=2048)
        if prompts is None:  # the prompts in the model's own tokens
            requests = sharegpt(args.num_prompts, args.dataset_path, llm.get_tokenizer())
            prompts = [r.prompt_token_ids[:1024] for r in requests]
        scores[quantization] = prompt_scores(llm, prompts)
        del llm
    (base, base_best), (fp8, fp8_best) = scores[None], scores["fp8"]
    agree = np.mean([a == b for a, b in zip(base_best, fp8_best)])
    print(f"{args.model}, {len(prompts)} ShareGPT prompts, {base.size} tokens scored")
    print("| weights | mean NLL per token | perplexity |\n| --- | --- | --- |")
    for name, logprobs in (("the model's dtype", base), ("fp8 projections", fp8)):
        print(f"| {name} | {-logprobs.mean():.4f} | {np.exp(-logprobs.mean()):.3f} |")
    print(f"most likely next token the same: {agree:.1%}")


if __name__ == "__main__":
    main()
