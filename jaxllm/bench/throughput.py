"""`jaxllm bench throughput`: offline throughput like vLLM's `benchmark_throughput` (every request generates
exactly its output length, EOS ignored)."""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

from jaxllm.bench.datasets import random_tokens, sharegpt
from jaxllm.bench.presets import random_weights_dir
from jaxllm.sampling_params import SamplingParams


class Workload(NamedTuple):
    """The engine and the requests a throughput run generates: prompts and their exact-length sampling params."""

    llm: Any
    requests: list
    prompts: list[dict]
    params: list[SamplingParams]


def workload(options: dict[str, Any], engine_args: dict[str, Any]) -> Workload:
    """The engine for `options` (a model, or `random_weights`) and its requests, as `run` times them."""
    from jaxllm.llm import LLM

    model = options["model"]
    if options.get("random_weights"):
        model = random_weights_dir(options["random_weights"])
        engine_args = {**engine_args, "load_format": "dummy", "skip_tokenizer_init": True}
    # ShareGPT prompts keep the workload's token ids (SmolLM2's tokenizer): their lengths, which is what
    # throughput depends on, are those of vLLM's sampling, whatever the model.
    requests = sharegpt(options["num_prompts"], options.get("dataset_path")) if options["dataset"] == "sharegpt" \
        else None
    longest = (max(len(r.prompt_token_ids) + r.output_len for r in requests) if requests
               else options["input_len"] + options["output_len"])
    if "max_model_len" not in engine_args:  # just what the workload needs: keeps per-step arrays small
        engine_args = {**engine_args, "max_model_len": -(-longest // 256) * 256}
    llm = LLM(model, **engine_args)
    if requests is None:
        requests = random_tokens(options["num_prompts"], options["input_len"], options["output_len"],
                                 llm.llm_engine.model_config.vocab_size, seed=engine_args.get("seed") or 0)
    vocab = llm.llm_engine.model_config.vocab_size  # a smaller vocabulary gets the ids folded into it
    prompts = [{"prompt_token_ids": [t % vocab for t in r.prompt_token_ids]} for r in requests]
    # vLLM's settings; `sampling` (not a CLI flag: benchmarks/sharegpt_sampling.py) overrides them.
    settings = {"temperature": 1.0, "top_p": 1.0, **options.get("sampling", {})}
    params = [SamplingParams(**settings, ignore_eos=True, max_tokens=r.output_len) for r in requests]
    return Workload(llm, requests, prompts, params)


def run(options: dict[str, Any], engine_args: dict[str, Any]) -> dict[str, Any]:
    llm, requests, prompts, params = workload(options, engine_args)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    if generated != [r.output_len for r in requests]:
        raise RuntimeError("a request did not generate exactly its output length")
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    total = prompt_tokens + sum(generated)
    result = {"elapsed_time": elapsed, "num_requests": len(requests), "total_num_tokens": total,
              "requests_per_second": len(requests) / elapsed, "tokens_per_second": total / elapsed,
              "output_tokens_per_second": sum(generated) / elapsed,
              "model": options.get("random_weights") or options["model"]}
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} total "
          f"tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s")
    if options.get("output_json"):
        with open(options["output_json"], "w") as f:
            json.dump(result, f, indent=2)
    return result
