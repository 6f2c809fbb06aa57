"""Incremental detokenization (byte-level BPE and SentencePiece) and stop strings across token boundaries."""

import pytest
import sentencepiece as spm
import transformers

from jaxllm import SamplingParams
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.output_processor import Completion
from jaxllm.request import Request
from jaxllm.weights.sources import DEFAULT_MODEL, load_tokenizer, resolve_source

TEXTS = ["Héllo wörld, 日本語のテキスト 😀🎉 end.", "  two  spaces\nand a new line", "naïve café — “quotes”"]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(resolve_source(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """A small SentencePiece model with byte fallback, as Llama 2 and Gemma tokenizers are."""
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(["Hello world, this is a test of the tokenizer.", "spaces and new lines"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "tokenizer"), vocab_size=320,
                                   byte_fallback=True, model_type="bpe")
    return transformers.LlamaTokenizer.from_pretrained(root)


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(request, which, text):
    tokenizer = request.getfixturevalue(which)
    prompt = tokenizer.encode("Prompt:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids]
    added = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]  # the text the output adds
    assert "".join(deltas) == added == detok.text
    assert not any("\ufffd" in d for d in deltas)
    if which == "sentencepiece":
        assert any(d.startswith(" ") for d in deltas)  # the ▁ markers became spaces mid-sequence


def completion(tokenizer, **params):
    request = Request("r", tokenizer.encode("Q:"), SamplingParams(**params), max_tokens=100, seed=0)
    return Completion(request, "r", IncrementalDetokenizer(tokenizer, request.token_ids), frozenset(), 10_000)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(bpe, include):
    c = completion(bpe, stop=["STOP HERE"], include_stop_str_in_output=include)
    ids = bpe.encode("Some answer STOP HERE and more", add_special_tokens=False)
    shown = []
    for token in ids:
        done = c.append(token, 0.0, None)
        shown.append(c.visible_text())
        if done:
            break
    expected = "Some answer STOP HERE" if include else "Some answer "
    assert c.text == expected and c.request.finish_reason == "stop" and c.request.stop_reason == "STOP HERE"
    assert all(not s.endswith(("S", "ST", "STOP")) for s in shown[:-1])  # a stop's start is held back


def test_eos_and_stop_token_ids_respect_min_tokens(bpe):
    c = completion(bpe, stop_token_ids=[42], min_tokens=2)
    c.eos_token_ids = frozenset({2})
    assert not c.append(2, 0.0, None)  # before min_tokens: not a stop
    assert c.append(42, 0.0, None)
    assert (c.request.finish_reason, c.request.stop_reason) == ("stop", 42)
    c = completion(bpe, ignore_eos=True, max_tokens=2)
    c.eos_token_ids = frozenset({2})
    c.request.max_tokens = 2
    assert not c.append(2, 0.0, None)
    assert c.append(2, 0.0, None) and c.request.finish_reason == "length"
