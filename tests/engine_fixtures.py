"""Shared pieces of the engine tests: the transformers reference for SmolLM2 and realistic prompts."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import jax
import torch
import transformers

from jaxllm import LLM
from jaxllm.weights.sources import DEFAULT_MODEL, resolve_source

ROOT = Path(__file__).resolve().parent.parent
SHAREGPT = ROOT.parent / "shared" / "workloads" / "sharegpt1000.json"


def hf_smollm2() -> transformers.PreTrainedModel:
    source = resolve_source(DEFAULT_MODEL)
    return transformers.AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.path.name, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_tokens: int, eos_token_id: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def text_token_ids(tokenizer, count: int) -> list[list[int]]:
    """Real text as token ids: ShareGPT prompts (SmolLM2's tokenizer) when the workload is beside the repo,
    else this repository's own docs."""
    if SHAREGPT.is_file():
        requests = json.loads(SHAREGPT.read_text())["requests"]
        return [r["prompt_token_ids"] for r in requests[:count]]
    text = " ".join(p.read_text() for p in sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"])
    ids = tokenizer.encode(text)
    return [ids[i * 37:] for i in range(count)]


def start_logged(model: str, **kwargs) -> tuple[LLM, str]:
    """`LLM(model, **kwargs)` and its start-up line ("engine ready in ...")."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    engine_logger = logging.getLogger("jaxllm.llm_engine")
    engine_logger.addHandler(handler)
    try:
        llm = LLM(model, **kwargs)
    finally:
        engine_logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if r.getMessage().startswith("engine ready")]
    assert len(lines) == 1, lines
    return llm, lines[0]


@contextlib.contextmanager
def compilations():
    """The names of the XLA compilations that happen inside the block (a list filled as they occur)."""
    compiles: list[str] = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def assert_idle(engine, wait_s: float = 5.0) -> None:
    """No request left in the `LLMEngine` and every KV page back in the pool (waiting up to `wait_s` for a
    background step loop to finish aborting)."""
    deadline = time.monotonic() + wait_s
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_pages
