"""The engine on a Hugging Face directory (random weights, SmolLM2's tokenizer and a generation_config.json):
greedy parity with transformers, generation_config defaults, and the interactive `jaxllm chat`."""

import numpy as np
import pytest
from transformers import GenerationConfig

from jaxllm import LLM, SamplingParams
from jaxllm.cli import main
from jaxllm.weights.sources import DEFAULT_MODEL, load_tokenizer, resolve_source
from tests.engine_fixtures import hf_greedy
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    hf = make_tiny("qwen2", path, vocab_size=49152)
    load_tokenizer(resolve_source(DEFAULT_MODEL)).save_pretrained(path)
    GenerationConfig(temperature=0.6, top_k=5, max_new_tokens=7, eos_token_id=2, do_sample=True).save_pretrained(
        path)
    return path, hf


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory):
    return LLM(str(model_dir[0]), max_model_len=256, max_num_batched_tokens=32,
               compilation_cache_dir=str(tmp_path_factory.mktemp("xla")))


def test_greedy_matches_transformers(llm, model_dir):
    _, hf = model_dir
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 49152, n).tolist() for n in (3, 17, 40, 90)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12, None)


def test_generation_config_supplies_the_defaults(llm):
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.6, 5, 7)
    out = llm.generate("Hello there", use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 7


def test_cli_chat_streams_a_reply(model_dir, tmp_path, monkeypatch, capsys):
    answers = iter(["Hi!", "And again?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    main(["chat", "--model", str(model_dir[0]), "--max-model-len", "256", "--max-num-batched-tokens", "32",
          "--temperature", "0", "--max-tokens", "5", "--compilation-cache-dir", str(tmp_path)])
    assert next(answers, None) is None  # both turns were asked and answered, then the empty line ended it
    assert capsys.readouterr().out.strip()


def test_pallas_tpu_backend_gives_the_reference_tokens(llm, model_dir, tmp_path):
    """The Mosaic TPU kernel (interpreted on CPU) through the whole engine: mixed prefill and decode batches."""
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(3, 49152, n).tolist()} for n in (2, 21, 50)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    kernel_llm = LLM(str(model_dir[0]), max_model_len=256, max_num_batched_tokens=32, attention_backend="pallas_tpu",
                     num_gpu_blocks_override=64,  # the interpreter copies the whole cache into its simulated HBM
                     compilation_cache_dir=str(tmp_path))
    assert [o.outputs[0].token_ids for o in kernel_llm.generate(prompts, params, use_tqdm=False)] == expected
