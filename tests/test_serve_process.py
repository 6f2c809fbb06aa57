"""`jaxllm serve` as a process: flags from a YAML file, and SIGTERM lets running requests finish, then exit 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from jaxllm.weights.sources import DEFAULT_MODEL, load_tokenizer, resolve_source
from tests.live_server import free_port
from tests.tiny_models import make_tiny


@pytest.fixture()
def served(tmp_path):
    model = tmp_path / "model"
    make_tiny("llama", model, vocab_size=49152)
    load_tokenizer(resolve_source(DEFAULT_MODEL)).save_pretrained(model)
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"port": port, "max-model-len": 512, "max_num_batched_tokens": 32,
                                      "served-model-name": ["tiny"], "compilation_cache_dir": str(tmp_path / "xla"),
                                      "timeout_graceful_shutdown": 30}))
    process = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "serve", str(model), "--config", str(config),
                                "--host", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"server did not start:\n{process.stdout.read()}")
    yield process, url
    if process.poll() is None:
        process.kill()


def test_yaml_config_and_graceful_sigterm(served):
    process, url = served
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny"]
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 512
    chunks, first_chunk = [], threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 150, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # refused: the listener is closed (or 503 on a kept-alive connection)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "new"}, timeout=5)
        refused.raise_for_status()
    reader.join(120)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the running request finished
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 0
    assert process.wait(60) == 0
