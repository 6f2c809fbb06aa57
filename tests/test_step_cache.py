"""The step cache (`jaxllm.compilation.StepCache`): a restart with the same settings loads every compiled step
variant instead of tracing and compiling it, generates the same tokens, and still donates the KV cache; a
setting that changes the program, or an unreadable entry, compiles afresh."""

from __future__ import annotations

import logging
import re

import pytest

from jaxllm import LLM, SamplingParams
from tests.engine_fixtures import start_logged
from tests.tiny_models import make_tiny

PROMPTS = [{"prompt_token_ids": list(range(3 + i, 40 + 5 * i))} for i in range(3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny("llama", path)
    return path


def start(model_dir, cache_dir, logprobs: int, **overrides) -> tuple[LLM, tuple[int, int]]:
    """An engine on `cache_dir`; also how many step variants it (loaded, compiled), from its start-up line.
    JAX's own caches live for the whole process, so each test gives its programs their own `max_logprobs`
    (`logprobs`): its first start then compiles afresh, as a new process would."""
    llm, line = start_logged(str(model_dir), skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
                             max_num_batched_tokens=64, num_gpu_blocks_override=32, num_scheduler_steps=4,
                             compilation_cache_dir=str(cache_dir), max_logprobs=logprobs, **overrides)
    counts = re.search(r"\((\d+) loaded from the step cache, (\d+) compiled\)", line)
    return llm, (int(counts[1]), int(counts[2]))


def tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_restart_loads_every_variant_and_generates_the_same_tokens(model_dir, tmp_path):
    first, (loaded, compiled) = start(model_dir, tmp_path, 11)
    variants = len(first.llm_engine.runner._executables)
    assert (loaded, compiled) == (0, variants)
    expected = tokens(first)
    del first
    again, (loaded, compiled) = start(model_dir, tmp_path, 11)
    assert (loaded, compiled) == (variants, 0)
    runner = again.llm_engine.runner
    cache_before = runner.kv_cache
    assert tokens(again) == expected
    assert cache_before.is_deleted()  # the loaded steps still donate the KV cache: no second copy of it


def test_a_setting_that_changes_the_program_compiles_afresh(model_dir, tmp_path):
    start(model_dir, tmp_path, 12)
    other, (loaded, compiled) = start(model_dir, tmp_path, 5)
    assert (loaded, compiled) == (0, len(other.llm_engine.runner._executables))


def test_an_unreadable_entry_is_compiled_again_and_replaced(model_dir, tmp_path, caplog):
    first, _ = start(model_dir, tmp_path, 13)
    expected = tokens(first)
    del first
    entries = sorted((tmp_path / "steps").glob("*.step"))
    entries[0].write_bytes(b"not a compiled step")
    with caplog.at_level(logging.WARNING, logger="jaxllm.compilation"):
        again, (loaded, compiled) = start(model_dir, tmp_path, 13)
    assert (loaded, compiled) == (len(entries) - 1, 1)
    assert any("is unusable" in r.getMessage() and entries[0].name in r.getMessage() for r in caplog.records)
    assert tokens(again) == expected
    third, (loaded, compiled) = start(model_dir, tmp_path, 13)
    assert loaded >= len(entries) - 1 and loaded + compiled == len(entries)  # see the next test
    assert tokens(third) == expected


def test_variants_that_came_from_jax_cache_still_run_after_the_next_restart(model_dir, tmp_path):
    """A step-cache miss that JAX's own cache serves (after a jaxllm upgrade that left the program alone) must
    not leave a broken entry: XLA:CPU cannot serialize such an executable again."""
    first, _ = start(model_dir, tmp_path, 14)
    expected = tokens(first)
    del first
    for entry in (tmp_path / "steps").glob("*.step"):
        entry.unlink()
    start(model_dir, tmp_path, 14)
    third, (loaded, compiled) = start(model_dir, tmp_path, 14)
    assert loaded + compiled == len(third.llm_engine.runner._executables)
    assert tokens(third) == expected

