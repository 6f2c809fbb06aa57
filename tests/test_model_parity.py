"""Every supported architecture computes what `transformers` computes: prefill and paged decode."""

import numpy as np
import pytest
import torch
from flax import nnx

from jaxllm.model_loader import load_model
from tests.paged import PagedRunner
from tests.tiny_models import TINY, make_tiny

PROMPTS = [list(range(3, 23)), [7, 8, 9], list(range(40, 53))]


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_tiny(request.param, path, shard=request.param == "llama")
    return request.param, path, model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_prefill_batch_matches_transformers(tiny):
    name, path, hf = tiny
    loaded = load_model(str(path), dtype="float32")
    runner = PagedRunner(loaded.model, page_size=8)
    out = runner.step(dict(enumerate(PROMPTS)), pad_tokens=5)
    for seq, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(out[seq], hf_logits(hf, prompt), rtol=1e-4, atol=1e-4, err_msg=name)


def test_folded_norm_scales_match_transformers(tiny):
    """With the decoder norms' scales folded into the projections that read them (as `load_model` does for the
    Mosaic GPU kernels), the model still computes what `transformers` computes (the tiny models' norm scales are
    random), and the scales are gone from the layer stack."""
    name, path, hf = tiny
    model = load_model(str(path), dtype="float32").model
    model.layers.fold_norm_scales()
    model.layers.fold_norm_scales()  # a second call changes nothing
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model.layers))}
    assert not names & {"input_norm", "post_attention_norm"}, names
    out = PagedRunner(model, page_size=8).step(dict(enumerate(PROMPTS)), pad_tokens=5)
    for seq, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(out[seq], hf_logits(hf, prompt), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_decode_matches_transformers(tiny, page_size):
    """Prefill two prompts (spanning several pages), then decode both token by token in one batch."""
    name, path, hf = tiny
    runner = PagedRunner(load_model(str(path)).model, page_size=page_size)
    seqs = {0: list(PROMPTS[0]), 1: list(PROMPTS[2])}
    out = runner.step({s: list(t) for s, t in seqs.items()})
    for _ in range(12):
        feeds = {}
        for s in seqs:
            ref = hf_logits(hf, seqs[s])[-1]
            np.testing.assert_allclose(out[s][-1], ref, rtol=1e-4, atol=1e-4, err_msg=f"{name} seq {s}")
            feeds[s] = [int(ref.argmax())]
            seqs[s] += feeds[s]
        out = runner.step(feeds, pad_tokens=2)


def test_bfloat16_weights_and_cache(tiny):
    name, path, hf = tiny
    loaded = load_model(str(path), dtype="bfloat16")
    params = [x for x in __import__("jax").tree.leaves(__import__("flax").nnx.state(loaded.model))]
    assert all(p.dtype == np.dtype("bfloat16") for p in params)
    runner = PagedRunner(loaded.model, page_size=8)
    assert runner.kv_cache.dtype == np.dtype("bfloat16")
    out = runner.step({0: PROMPTS[0]})
    ref = hf_logits(hf, PROMPTS[0])
    np.testing.assert_allclose(out[0], ref, atol=0.05 * np.abs(ref).max(), err_msg=name)
