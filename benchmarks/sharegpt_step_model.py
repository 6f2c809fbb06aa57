"""A model, not a measurement: how long ShareGPT-500 takes on one GPU if every engine step costs what its
bytes and FLOPs cost (Llama-3.1-8B shape, bfloat16), scheduled first come first served with chunked prefill.

Each step reads the weights once (`--weights-ms`), reads every running sequence's KV context
(131,072 bytes per token of context at 8B shape: 32 layers x 8 KV heads x 128 x 2 x 2 bytes, at
`--bandwidth`), computes its prefill tokens (`--prefill-ms-per-token`, about 16 GFLOP a token) and pays a fixed
overhead (`--overhead-ms`: launches, small kernels, host gaps). A request's decode tokens come one per step.
The run ends when the last request does, so the total is about the sum of the step times over the longest
request's life: what bounds it is per-step time, not how many requests run at once.

    python benchmarks/sharegpt_step_model.py --dataset-path ../shared/workloads/sharegpt1000.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2


@dataclasses.dataclass(frozen=True)
class StepCost:
    weights_ms: float = 6.1  # the GEMMs of one step at 8B shape (H100 profile: 6.06 ms)
    overhead_ms: float = 1.5  # the rest of a batch-1 step: 8.06 ms measured minus the GEMMs, less attention
    prefill_ms_per_token: float = 0.027  # 16 GFLOP at ~600 TFLOP/s
    bandwidth: float = 3.0e12  # bytes/s the attention kernel reads the cache at
    kv_scale: float = 1.0  # 0.5: an 8-bit KV cache

    def step_ms(self, context_tokens: int, prefill_tokens: int) -> float:
        kv_ms = context_tokens * KV_BYTES_PER_TOKEN * self.kv_scale / self.bandwidth * 1e3
        return self.weights_ms + self.overhead_ms + kv_ms + prefill_tokens * self.prefill_ms_per_token


def simulate(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int, max_num_batched_tokens: int,
             cost: StepCost) -> float:
    """Seconds until the last request finishes."""
    waiting = list(range(len(prompt_lens)))
    prefilled: dict[int, int] = {}  # request -> prompt tokens computed
    generated: dict[int, int] = {}
    elapsed_ms, done = 0.0, 0
    while done < len(prompt_lens):
        decoding = [i for i in prefilled if prefilled[i] == prompt_lens[i]]
        budget = max_num_batched_tokens - len(decoding)
        context = sum(prompt_lens[i] + generated[i] for i in decoding)
        prefill = 0
        for i in [i for i in prefilled if prefilled[i] < prompt_lens[i]]:
            take = min(prompt_lens[i] - prefilled[i], budget - prefill)
            prefilled[i] += take
            prefill += take
        while waiting and len(prefilled) < max_num_seqs and prefill < budget:
            i = waiting.pop(0)
            prefilled[i], generated[i] = min(prompt_lens[i], budget - prefill), 0
            prefill += prefilled[i]
        elapsed_ms += cost.step_ms(context, prefill)
        for i in decoding:
            generated[i] += 1
            if generated[i] == output_lens[i]:
                del prefilled[i], generated[i]
                done += 1
    return elapsed_ms / 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-path", default="../shared/workloads/sharegpt1000.json")
    parser.add_argument("--num-prompts", type=int, default=500)
    args = parser.parse_args()
    requests = json.load(open(args.dataset_path))["requests"][:args.num_prompts]
    prompts = [len(r["prompt_token_ids"]) for r in requests]
    outputs = [r["output_len"] for r in requests]
    base = StepCost()
    cases = [
        ("today's costs, 256 seqs / 2048 tokens (jaxllm's defaults)", 256, 2048, base),
        ("today's costs, 1024 seqs / 16384 tokens (vLLM V1's on an H100)", 1024, 16384, base),
        ("overhead cut to 0.5 ms", 256, 2048, dataclasses.replace(base, overhead_ms=0.5)),
        ("8-bit KV cache", 256, 2048, dataclasses.replace(base, kv_scale=0.5)),
        ("the memory floor: weights 5.5 ms, no overhead", 256, 2048,
         dataclasses.replace(base, weights_ms=5.5, overhead_ms=0.0)),
        ("floor and an 8-bit KV cache", 256, 2048,
         dataclasses.replace(base, weights_ms=5.5, overhead_ms=0.0, kv_scale=0.5)),
        ("8-bit weights and KV cache, overhead 0.5 ms", 256, 2048,
         dataclasses.replace(base, weights_ms=3.05, overhead_ms=0.5, kv_scale=0.5)),
    ]
    print(f"longest request: {max(outputs)} output tokens (request {outputs.index(max(outputs))})")
    print("| case | modelled time | requests/s |\n| --- | --- | --- |")
    for name, seqs, tokens, cost in cases:
        seconds = simulate(prompts, outputs, seqs, tokens, cost)
        print(f"| {name} | {seconds:.1f} s | {len(prompts) / seconds:.1f} |")


if __name__ == "__main__":
    main()
