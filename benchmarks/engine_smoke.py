"""Engine smoke test on an accelerator with a random Llama-shaped checkpoint (no tokenizer, no download).

1. Parity: greedy tokens of jaxllm (float32) equal transformers' (float32, same device kind) on 8 prompts.
2. Throughput: 256 requests (prompts 64-512 tokens, 128 output tokens each, EOS ignored) in bfloat16.
Prints the KV-cache size the engine chose, start-up time and output tokens/s.

    python benchmarks/engine_smoke.py [--layers 8] [--hidden 1024] [--requests 256]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np


def make_checkpoint(path: str, layers: int, hidden: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 128, max_position_embeddings=2048,
                                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)  # dtype "auto" -> bf16


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p], device=device), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            outs.append(ids[0, len(p):].tolist())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return outs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    path = tempfile.mkdtemp()
    make_checkpoint(path, args.layers, args.hidden)
    parity_prompts = [rng.integers(0, 32000, int(n)).tolist() for n in rng.integers(5, 200, 8)]
    expected = hf_greedy(path, parity_prompts, 16)

    from jaxllm import LLM, SamplingParams

    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, gpu_memory_utilization=0.3, max_model_len=2048)
    got = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in parity_prompts],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)]
    matches = sum(g == e for g, e in zip(got, expected))
    del llm
    gc.collect()

    start = time.perf_counter()
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=2048)
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": rng.integers(0, 32000, int(n)).tolist()}
               for n in rng.integers(64, 512, args.requests)]
    params = SamplingParams(temperature=0.8, max_tokens=128, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    pool = llm.llm_engine.scheduler.pool
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("| check | value |")
    print("| --- | --- |")
    print(f"| greedy parity float32 vs transformers | {matches}/{len(expected)} prompts identical |")
    print(f"| dtype (auto) | {llm.llm_engine.model_config.dtype} |")
    print(f"| KV pages x block | {pool.num_pages} x {pool.page_size} = {pool.num_pages * pool.page_size} tokens |")
    print(f"| start-up (load + compile) | {startup:.1f} s |")
    print(f"| {args.requests} requests, 128 out each | {elapsed:.2f} s, {len(outputs) / elapsed:.1f} req/s, "
          f"{out_tokens / elapsed:.0f} output tok/s |")
    print(f"| pages free after | {pool.num_free == pool.num_pages} |")


if __name__ == "__main__":
    main()
