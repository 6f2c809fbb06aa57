"""The default model, SmolLM2-135M-Instruct from its GGUF, against transformers' own load of the same file."""

import numpy as np
import pytest
import torch
import transformers

from jaxllm.model_loader import load_model
from jaxllm.weights.sources import DEFAULT_MODEL, load_generation_config, load_tokenizer, resolve_source
from tests.paged import PagedRunner

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    source = resolve_source(DEFAULT_MODEL)
    tokenizer = load_tokenizer(source)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.path.name, dtype=torch.float32).eval()
    loaded = load_model(DEFAULT_MODEL)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return loaded, hf, tokenizer, prompt


def test_default_model_is_smollm2_gguf(smollm2):
    loaded, _, tokenizer, _ = smollm2
    cfg = loaded.config
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("LlamaForCausalLM", 30, 9, 3)
    assert cfg.tie_word_embeddings and cfg.dtype == "float32"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


def test_logits_match_transformers_gguf_load(smollm2):
    loaded, hf, _, prompt = smollm2
    out = PagedRunner(loaded.model, page_size=16).step({0: prompt, 1: prompt[:9]})
    with torch.no_grad():
        for seq, tokens in ((0, prompt), (1, prompt[:9])):
            ref = hf(torch.tensor([tokens])).logits[0].numpy()
            np.testing.assert_allclose(out[seq], ref, rtol=1e-3, atol=2e-3 * np.abs(ref).max())


def test_greedy_answer_matches_transformers(smollm2):
    loaded, hf, tokenizer, prompt = smollm2
    eos = load_generation_config(resolve_source(DEFAULT_MODEL), loaded.hf_config).eos_token_id
    runner = PagedRunner(loaded.model, page_size=16)
    logits = runner.step({0: prompt})[0]
    tokens = []
    while len(tokens) < 24:
        tokens.append(int(logits[-1].argmax()))
        if tokens[-1] == eos:
            break
        logits = runner.step({0: tokens[-1:]})[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=eos)[0, len(prompt):].tolist()
    assert tokens == expected
    assert tokenizer.decode(tokens, skip_special_tokens=True) == "The capital of France is Paris."
