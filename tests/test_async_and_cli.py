"""The async engine (streamed deltas, abort on cancel, health) and the `jaxllm` CLI."""

import asyncio
import json

import pytest

from jaxllm import SamplingParams
from jaxllm.async_engine import AsyncEngine
from jaxllm.cli import main
from tests.engine_fixtures import assert_idle

PARAMS = SamplingParams(temperature=0.0, max_tokens=16)
PROMPT = "The capital of Italy is"


@pytest.fixture(scope="module")
def offline(smollm2_llm):
    """The reference result, computed before the async engine's thread starts stepping the same engine."""
    return smollm2_llm.generate(PROMPT, PARAMS, use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def async_engine(smollm2_llm, offline):
    engine = AsyncEngine(smollm2_llm.llm_engine)
    yield engine
    engine.shutdown()


def test_streamed_deltas_add_up_to_the_offline_result(offline, async_engine):
    async def consume(request_id):
        return [o async for o in async_engine.generate(PROMPT, PARAMS, request_id)]

    async def both():
        return await asyncio.gather(consume("a"), consume("b"))

    for deltas in asyncio.run(both()):
        assert "".join(d.outputs[0].text for d in deltas) == offline.text
        assert sum((d.outputs[0].token_ids for d in deltas), []) == offline.token_ids
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert async_engine.healthy


def test_cancelling_a_stream_aborts_the_request(smollm2_llm, async_engine):
    engine = smollm2_llm.llm_engine

    async def first_then_cancel():
        stream = async_engine.generate("Count to a thousand:", SamplingParams(max_tokens=500, ignore_eos=True), "c")
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert not asyncio.run(first_then_cancel()).finished
    assert_idle(engine)


def test_refused_request_raises_and_the_loop_lives_on(async_engine):
    async def bad():
        async_engine.generate({"prompt_token_ids": []}, SamplingParams(), "bad")

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(bad())
    assert async_engine.healthy


def test_cli_generate_jsonl(tmp_path, capsys):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n" + json.dumps("1, 2, 3,") + "\n")
    target = tmp_path / "out.jsonl"
    main(["generate", "--input", str(source), "--output", str(target), "--max-model-len", "256",
          "--max-num-batched-tokens", "32", "--temperature", "0", "--max-tokens", "6", "--n", "2",
          "--compilation-cache-dir", str(tmp_path / "xla")])
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["prompt"], r["index"]) for r in rows] == [
        ("The capital of France is", 0), ("The capital of France is", 1), ("1, 2, 3,", 0), ("1, 2, 3,", 1)]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in rows)
    assert rows[0]["text"] == rows[1]["text"]  # greedy


def test_cli_reports_bad_input_without_traceback(tmp_path):
    with pytest.raises(SystemExit, match="no prompts"):
        main(["generate"])
    with pytest.raises(SystemExit, match="max_model_len"):
        main(["generate", "hello", "--model", "SmolLM2-135M-Instruct", "--max-model-len", "999999"])
