"""A model, not a measurement: how long ShareGPT-500 takes on one GPU if every engine step costs what its
bytes and FLOPs cost (Llama-3.1-8B shape), scheduled first come first served with chunked prefill, as the
engine schedules it.

A step is a roofline: its GEMMs take the longer of reading the weights once (`weights_ms`) and computing its
tokens (prefill and decode alike, about 16 GFLOP a token, at `tflops`); then it reads every running
sequence's KV context (131,072 bytes per token of context in bfloat16: 32 layers x 8 KV heads x 128 x 2 x 2
bytes, at `kv_bandwidth`) and pays a fixed overhead (`overhead_ms`: the small kernels and gaps of a step).
The defaults are calibrated on the H100 at `99c33ed`: batch-1 decode 7.00 ms (GEMMs and LM head 5.6 ms, the
rest 1.4), and the 256-sequence step at context 479, 14.89 ms (GEMMs 6.91 ms: 594 TFLOP/s; attention 6.6
ms: 2.43 TB/s).

A request's decode tokens come one per step, so the run lasts at least as many steps as the longest request
has output tokens (1,888 here), and every step pays the weights. What other requests add to those steps is
their KV reads and whatever of their compute does not fit under the weight reads.

    python benchmarks/sharegpt_step_model.py --dataset-path ../shared/workloads/sharegpt1000.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
FLOP_PER_TOKEN = 16.06e9  # 2 x the 8.03 B parameters


@dataclasses.dataclass(frozen=True)
class StepCost:
    weights_ms: float = 5.6
    overhead_ms: float = 1.4
    tflops: float = 594.0
    kv_bandwidth: float = 2.43e12  # bytes/s the attention kernel reads the cache at
    kv_scale: float = 1.0  # 0.5: an 8-bit KV cache

    def step_ms(self, context_tokens: int, tokens: int) -> float:
        gemm_ms = max(self.weights_ms, tokens * FLOP_PER_TOKEN / (self.tflops * 1e12) * 1e3)
        kv_ms = context_tokens * KV_BYTES_PER_TOKEN * self.kv_scale / self.kv_bandwidth * 1e3
        return gemm_ms + kv_ms + self.overhead_ms


# The H100's limits: 16.06 GB of bfloat16 weights (8.0 GB in FP8 with a bfloat16 LM head) at the 3.17 TB/s a
# plain XLA reduction reads, the dense bfloat16 tensor-core peak of 989 TFLOP/s (1,979 for FP8).
FLOOR = StepCost(weights_ms=16.06e9 / 3.17e12 * 1e3, overhead_ms=0.0, tflops=989.0, kv_bandwidth=3.17e12)
FP8_FLOOR = dataclasses.replace(FLOOR, weights_ms=8.0e9 / 3.17e12 * 1e3, tflops=1979.0)


@dataclasses.dataclass(frozen=True)
class Run:
    seconds: float
    steps: int


def simulate(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int, max_num_batched_tokens: int,
             cost: StepCost) -> Run:
    """The run's length: decodes first in each step's token budget, then the prefills in arrival order."""
    waiting = list(range(len(prompt_lens)))
    prefilled: dict[int, int] = {}  # request -> prompt tokens computed
    generated: dict[int, int] = {}
    elapsed_ms, done, steps = 0.0, 0, 0
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
        elapsed_ms += cost.step_ms(context, prefill + len(decoding))
        steps += 1
        for i in decoding:
            generated[i] += 1
            if generated[i] == output_lens[i]:
                del prefilled[i], generated[i]
                done += 1
    return Run(elapsed_ms / 1e3, steps)


CASES = [
    ("today's costs (`99c33ed`), 256 sequences / 2048 tokens (jaxllm's defaults)", 256, 2048, StepCost()),
    ("today's costs, 256 / 256 (steps kept under the GEMMs' ridge)", 256, 256, StepCost()),
    ("today's costs, 1024 / 16384 (vLLM V1's defaults on an H100)", 1024, 16384, StepCost()),
    ("batch 1 at the 6.0 ms target (overhead 0.4 ms), otherwise today's", 256, 2048, StepCost(overhead_ms=0.4)),
    ("today's costs, 8-bit KV cache", 256, 2048, StepCost(kv_scale=0.5)),
    ("bfloat16 floor: weights at 3.17 TB/s, 989 TFLOP/s, KV at 3.17 TB/s, no overhead", 256, 2048, FLOOR),
    ("the bfloat16 floor, 256 / 256", 256, 256, FLOOR),
    ("the bfloat16 floor and an 8-bit KV cache", 256, 2048, dataclasses.replace(FLOOR, kv_scale=0.5)),
    ("FP8 weights today (`99c33ed`: batch 1 5.42 ms, 256-sequence step 13.21 ms)", 256, 2048,
     StepCost(weights_ms=4.1, overhead_ms=1.3, tflops=780.0)),
    ("FP8 weights today and an 8-bit KV cache", 256, 2048,
     StepCost(weights_ms=4.1, overhead_ms=1.3, tflops=780.0, kv_scale=0.5)),
    ("FP8 floor (8.0 GB of weights, 1,979 TFLOP/s, no overhead)", 256, 2048, FP8_FLOOR),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-path", default="../shared/workloads/sharegpt1000.json")
    parser.add_argument("--num-prompts", type=int, default=500)
    args = parser.parse_args()
    requests = json.load(open(args.dataset_path))["requests"][:args.num_prompts]
    prompts = [len(r["prompt_token_ids"]) for r in requests]
    outputs = [r["output_len"] for r in requests]
    print(f"longest request: {max(outputs)} output tokens (request {outputs.index(max(outputs))}); "
          f"{sum(prompts)} prompt and {sum(outputs)} output tokens in all")
    print("| case | batch-1 step | 256-sequence step | steps | modelled time | requests/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seqs, tokens, cost in CASES:
        run = simulate(prompts, outputs, seqs, tokens, cost)
        print(f"| {name} | {cost.step_ms(512, 1):.2f} ms | {cost.step_ms(256 * 479, 256):.2f} ms | {run.steps} "
              f"| {run.seconds:.1f} s | {len(prompts) / run.seconds:.1f} |")


if __name__ == "__main__":
    main()
