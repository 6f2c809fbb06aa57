"""`jaxllm bench throughput` and `jaxllm bench serve` on small inputs: they run and count right."""

import json

import pytest

from jaxllm.async_engine import AsyncEngine
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
