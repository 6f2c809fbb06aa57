"""Benchmark requests: the ShareGPT workload (sampled as vLLM's `benchmark_serving` does) or random tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

# The workload beside the repository: 1000 ShareGPT requests, first two turns, shuffle seed 0, vLLM's length
# filters, tokenized with SmolLM2's tokenizer.
SHAREGPT = Path(__file__).resolve().parents[2].parent / "shared" / "workloads" / "sharegpt1000.json"


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    output_len: int


def sharegpt(num_prompts: int, path: Path | None = None, tokenizer=None) -> list[BenchRequest]:
    """The first `num_prompts` requests; re-tokenized with `tokenizer` when one is given (the workload's ids
    are SmolLM2's), else their stored ids are used (right for SmolLM2 and for random-weight models)."""
    path = path or SHAREGPT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --dataset-path or use --dataset random")
    requests = json.loads(path.read_text())["requests"][:num_prompts]
    return [BenchRequest(r["prompt"], tokenizer.encode(r["prompt"]) if tokenizer else list(r["prompt_token_ids"]),
                         int(r["output_len"])) for r in requests]


def random_tokens(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                  seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    return [BenchRequest(None, rng.integers(0, vocab_size, input_len).tolist(), output_len)
            for _ in range(num_prompts)]
