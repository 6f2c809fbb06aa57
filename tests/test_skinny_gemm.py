"""`pallas_kernels.skinny_gemm`, run by JAX's GPU interpreter on CPU: products of one layer of a stacked
weight against float32 matmuls, its contract errors, and the model streaming its MLP weights through it.

Mosaic's lowering and the kernel's speed are checked on an H100 by `benchmarks/skinny_gemm.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import skinny_gemm
from pallas_kernels.skinny_gemm import GemmSizes, skinny_matmul
from tests.test_reference_attention import random_batch
from tests.tiny_models import make_tiny

CASES = [
    # rows, K, N, layer, sizes
    (1, 128, 192, 2, GemmSizes(tile_n=64, tile_k=64, num_stages=2, splits=1)),  # one row, padded to 8
    (5, 256, 256, 0, GemmSizes(tile_n=128, tile_k=64, num_stages=2, splits=2)),  # two K splits
    (16, 512, 128, 1, GemmSizes(tile_n=128, tile_k=128, num_stages=3, splits=1)),  # a ring of 3 stages, reused
    (64, 192, 64, 2, GemmSizes(tile_n=128, tile_k=128, num_stages=4)),  # tiles shrunk to fit, splits chosen
]


@pytest.mark.parametrize("rows,k,n,layer,sizes", CASES)
def test_matches_a_float32_product_of_the_chosen_layer(rows, k, n, layer, sizes):
    kx, kw = jax.random.split(jax.random.key(rows + k + n))
    x = jax.random.normal(kx, (rows, k), jnp.bfloat16)
    w = jax.random.normal(kw, (3, k, n), jnp.bfloat16)
    out = skinny_matmul(x, w, jnp.int32(layer), sizes)
    expected = np.asarray(x, np.float32) @ np.asarray(w[layer], np.float32)
    assert out.shape == (rows, n) and out.dtype == jnp.bfloat16
    # float32 accumulation, one bfloat16 rounding of the result
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())


def test_float32_output_keeps_the_float32_sum():
    x = jax.random.normal(jax.random.key(0), (3, 128), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (2, 128, 64), jnp.bfloat16)
    out = skinny_matmul(x, w, 1, GemmSizes(tile_n=64, tile_k=64, num_stages=2, splits=2), out_dtype=jnp.float32)
    expected = np.asarray(x, np.float32) @ np.asarray(w[1], np.float32)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,dtype,match", [
    ((65, 128), (1, 128, 64), jnp.bfloat16, "T <= 64"),
    ((4, 100), (1, 100, 64), jnp.bfloat16, "multiples of 64"),
    ((4, 128), (1, 128, 64), jnp.float32, "16-bit"),
])
def test_unsupported_operands_are_refused_with_a_clear_error(x_shape, w_shape, dtype, match):
    with pytest.raises(NotImplementedError, match=match):
        skinny_matmul(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype), 0)


def test_splits_that_do_not_divide_k_are_refused():
    with pytest.raises(ValueError, match="3 splits do not divide 4 K steps"):
        skinny_matmul(jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((1, 256, 64), jnp.bfloat16), 0,
                      GemmSizes(tile_n=64, tile_k=64, splits=3))


def _model_and_batch(tmp_path, backend: str, tokens: int):
    from jaxllm.model_loader import load_model

    make_tiny("llama", tmp_path, hidden_size=128, intermediate_size=192, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend=backend).model
    cfg = model.cfg
    _, _, _, cache, md = random_batch(np.random.default_rng(0), [tokens - 1, 1], [tokens + 8, 20], cfg.num_heads,
                                      cfg.num_kv_heads, cfg.head_dim, 16, max_seqs=3)
    cache = jnp.zeros((cfg.num_layers, *cache.shape[1:]), jnp.bfloat16)
    args = (jnp.arange(tokens, dtype=jnp.int32) + 5, jnp.arange(tokens), cache, md)
    return model, args


def test_small_steps_stream_the_mlp_weights_in_place(tmp_path, monkeypatch):
    """With the Mosaic GPU kernels, a step of at most 64 tokens hands each MLP weight's whole layer stack and
    the loop's counter to the kernel (twice per layer: gate/up and down), and its hidden states match XLA's
    GEMMs; a larger step leaves the MLP to XLA."""
    model, args = _model_and_batch(tmp_path, "pallas_gpu", 4)
    calls = []
    original = skinny_gemm._call_kernel

    def recording(layer, x, w, shapes):
        calls.append(w.shape)
        return original(layer, x, w, shapes)

    monkeypatch.setattr(skinny_gemm, "_call_kernel", recording)
    streamed, _ = model(*args)
    depth, hidden, mlp = model.cfg.num_layers, model.cfg.hidden_size, model.cfg.intermediate_size
    assert calls == [(depth, hidden, 2 * mlp), (depth, mlp, hidden)]  # traced once in the layer loop
    monkeypatch.setattr(type(model), "_streams_mlp", lambda *_: False)
    by_xla, _ = model(*args)
    np.testing.assert_allclose(np.asarray(streamed, np.float32), np.asarray(by_xla, np.float32), rtol=2e-2,
                               atol=2e-2)
    calls.clear()
    monkeypatch.undo()
    monkeypatch.setattr(skinny_gemm, "_call_kernel", recording)
    big_model, big_args = _model_and_batch(tmp_path, "pallas_gpu", skinny_gemm.MAX_ROWS + 1)
    big_model(*big_args)
    assert calls == []
