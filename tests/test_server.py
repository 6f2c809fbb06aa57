"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1, the real `openai` client, SmolLM2 on CPU."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm.async_engine import AsyncEngine
from serving.app import ServerConfig, build_app
from serving.tool_parser import parse_hermes
from tests.engine_fixtures import assert_idle as idle
from tests.live_server import LiveServer

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(smollm2_llm):
    async_engine = AsyncEngine(smollm2_llm.llm_engine)
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(build_app(engine, ServerConfig([MODEL, "smol"], enable_auto_tool_choice=True,
                                                     tool_call_parser="hermes")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def guarded(engine):
    """A second front door on the same engine: an API key and a queue limit of zero."""
    live = LiveServer(build_app(engine, ServerConfig([MODEL], api_key="s3cret", max_queued_requests=0)))
    yield live
    live.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def assert_idle(engine: AsyncEngine) -> None:
    idle(engine.engine)


def test_models_version_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "smol"]
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_chat_answers_and_reports_usage(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert_idle(engine)


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model="smol", prompt="The history of Rome", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat_whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    chat_stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30,
                                                 stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
    assert text == chat_whole.choices[0].message.content


def test_prompt_forms_echo_and_n(server, client):
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    out = client.completions.create(model=MODEL, prompt=["Hello world", "Goodbye"], max_tokens=5, temperature=0,
                                    n=2, echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text[:7] for c in out.choices] == ["Hello w", "Hello w", "Goodbye", "Goodbye"]
    assert out.choices[0].text == out.choices[1].text  # greedy
    assert out.usage.completion_tokens == 20
    as_ids = client.completions.create(model=MODEL, prompt=[tokens, tokens], max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert [c.text for c in as_ids.choices] == [out.choices[0].text[len("Hello world"):]] * 2


def test_seed_reproducibility_and_parallel_samples(client):
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=1.0, max_tokens=16, n=2, seed=42)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len(first.choices) == 2


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, logprobs=2,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_stop_strings(client):
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, stop=["Paris"])
    assert out.choices[0].message.content == "The capital of France is "
    assert out.choices[0].finish_reason == "stop"


def test_tokenize_detokenize(server):
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Héllo, wörld!"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Héllo, wörld!"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()
    assert chat["count"] > tokens["count"]


BAD = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": [1, 2, 10**7]}, "vocabulary"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_model_len"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("path,body,expected", BAD)
def test_invalid_requests_get_400_in_openai_shape(server, engine, path, body, expected):
    response = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert expected in error["message"] and error["type"] == "BadRequestError" and error["code"] == 400
    assert_idle(engine)


def test_malformed_json_unknown_model(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-5", "prompt": "hi"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_auth_queue_limit_and_shutdown(guarded):
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
    bad = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "AuthenticationError"
    headers = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{guarded.url}/v1/models", headers=headers).status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # not behind the key
    full = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
    assert full.status_code == 429 and full.json()["error"]["code"] == 429
    guarded.app.state.shutting_down = True
    try:
        assert httpx.get(f"{guarded.url}/v1/models", headers=headers).status_code == 503
        assert httpx.get(f"{guarded.url}/health").status_code == 503
    finally:
        guarded.app.state.shutting_down = False


def scrape(server) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{server.url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, sample.labels.get("finished_reason", ""))] = sample.value
    return values


def test_metrics_count_the_requests_made(server, client, engine):
    assert_idle(engine)
    before = scrape(server)
    replies = [client.completions.create(model=MODEL, prompt=f"Count {i}:", max_tokens=4 + i, temperature=0,
                                         extra_body={"ignore_eos": True}) for i in range(3)]
    after = scrape(server)

    def delta(name, reason=""):
        return after.get((name, reason), 0) - before.get((name, reason), 0)

    assert delta("jaxllm:request_success_total", "length") == 3
    assert delta("jaxllm:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)
    assert delta("jaxllm:generation_tokens_total") == sum(r.usage.completion_tokens for r in replies) == 15
    assert delta("jaxllm:e2e_request_latency_seconds_count") == 3
    assert delta("jaxllm:time_to_first_token_seconds_count") == 3
    assert delta("jaxllm:inter_token_latency_seconds_count") == 12
    assert after[("jaxllm:num_requests_running", "")] == 0 and after[("jaxllm:kv_cache_usage_perc", "")] == 0


def test_dropped_streams_are_aborted(server, engine):
    async def drop_after_first_chunk(client):
        stream = await client.completions.create(model=MODEL, prompt="Tell me a long story.", max_tokens=400,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        await asyncio.gather(*(drop_after_first_chunk(client) for _ in range(16)))
        start = time.monotonic()
        reply = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        return reply, time.monotonic() - start

    reply, elapsed = asyncio.run(main())
    assert reply.choices[0].text and elapsed < 10.0
    assert_idle(engine)


def test_non_streaming_client_that_hangs_up_is_aborted(server, engine):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "Story:", "max_tokens": 900, "ignore_eos": True},
                   timeout=1.0)
    assert_idle(engine)


def test_64_concurrent_streams(server, engine):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say a number: {i}"}], max_tokens=8, stream=True,
            temperature=0.7, seed=i)
        chunks = [c async for c in stream]
        return chunks[-1].choices[0].finish_reason

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    reasons = asyncio.run(main())
    assert len(reasons) == 64 and set(reasons) <= {"stop", "length"}
    assert_idle(engine)


def test_hermes_tool_calls_parsed_from_model_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>'
            '<tool_call>not json</tool_call>')
    content, calls = parse_hermes(text)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "CET"}
    assert content == "Let me check.\n\n<tool_call>not json</tool_call>"
    assert parse_hermes("plain answer") == ("plain answer", [])


def test_tools_through_the_api(client, guarded):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, tool_choice="auto", max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    refused = httpx.post(f"{guarded.url}/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                         json={"messages": QUESTION, "tools": tools, "tool_choice": "auto"})
    assert refused.status_code == 400 and "enable-auto-tool-choice" in refused.json()["error"]["message"]
