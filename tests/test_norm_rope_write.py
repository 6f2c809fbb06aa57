"""The norm, RoPE and K/V write kernel (`pallas_kernels.norm_rope_write`, Pallas Triton, run by Pallas's interpreter
on CPU) against `rms_norm`, `apply_rope` and the cache it should leave, its contract errors, and where the model
uses it: steps of at most `FUSED_NORM_ROPE_ROWS` rows on the Mosaic GPU path.

Triton's lowering and the kernel's speed are checked on an H100 by the decode benchmarks
(`benchmarks/decode_timeline.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model_loader import load_model
from jaxllm.models.layers import apply_rope, rms_norm, rope_tables
from jaxllm.models.llama import FUSED_NORM_ROPE_ROWS
from pallas_kernels.norm_rope_write import norm_rope_write
from pallas_kernels.reference import cache_values, to_cache_dtype
from tests.layer_loop import assert_fusion_matches_xla
from tests.tiny_models import make_tiny

LAYER = 1


def _operands(dtype, tokens: int, embed: int, kv_heads: int, group: int, head_dim: int):
    keys = jax.random.split(jax.random.key(tokens * embed + group), 3)
    x = (jax.random.normal(keys[0], (tokens, embed)) * 3).astype(dtype)
    qkv = jax.random.normal(keys[1], (tokens, kv_heads, group + 2, head_dim)).astype(dtype)
    cache = jax.random.normal(keys[2], (3, 6, 16, 2 * kv_heads, head_dim)).astype(dtype)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, head_dim, 2) / head_dim))
    return x, qkv, cache, rope_tables(jnp.arange(tokens) + 20, inv_freq)


def _expected(x, qkv, rope, eps):
    """q, k rotated and v, all `rms_norm(x) @ W` computed as the row scale of `x @ W`, in float32."""
    tokens, kv_heads, width, head_dim = qkv.shape
    scaled = qkv.astype(jnp.float32) * (rms_norm(x.astype(jnp.float32), None, eps) / x.astype(jnp.float32))[
        :, :1, None, None]
    q = apply_rope(scaled[:, :, :-2].reshape(tokens, -1, head_dim), rope).reshape(tokens, kv_heads, width - 2, -1)
    return np.asarray(q), np.asarray(apply_rope(scaled[:, :, -2], rope)), np.asarray(scaled[:, :, -1])


@pytest.mark.parametrize("dtype,embed,group,head_dim,cache_format", [
    (jnp.bfloat16, 192, 3, 64, None),  # an embedding of 3 x 64 and a group of 3: neither a power of two
    (jnp.float16, 128, 4, 128, None),
    (jnp.bfloat16, 128, 4, 64, "float8_e4m3fn"),  # 8-bit caches, stored as bytes
    (jnp.bfloat16, 192, 3, 64, "float8_e5m2"),
])
def test_writes_the_normalized_rotated_rows_and_the_cache(dtype, embed, group, head_dim, cache_format):
    x, qkv, cache, rope = _operands(dtype, 5, embed, 2, group, head_dim)
    if cache_format:  # large entries, so that the writes must saturate
        qkv = qkv.at[:, :, -2:].multiply(400.0 if cache_format == "float8_e4m3fn" else 1e5)
        cache = jax.lax.bitcast_convert_type(cache.astype(cache_format), jnp.uint8)
    # tokens 0-3 real (two in one page, then two more pages), token 4 padding
    page, slot, first, real = [2, 2, 5, 0, 4], [3, 4, 0, 15, 1], [0, 8, 16, 24, 0], [1, 1, 1, 1, 0]
    table = jnp.asarray(np.stack([page, slot, first, real], axis=1), jnp.int32)
    rows, out = norm_rope_write(x, qkv, rope, cache, jnp.int32(LAYER), table, 40, 1e-5, cache_format)
    assert rows.shape == (2, 40, head_dim) and rows.dtype == dtype and out.dtype == cache.dtype
    q, k, v = _expected(x, qkv, rope, 1e-5)
    if cache_format:  # what the reference writes: K/V in the model's dtype, saturated to the 8-bit type
        k, v = (np.asarray(to_cache_dtype(jnp.asarray(a, dtype), cache_format)) for a in (k, v))
        assert np.isfinite(k.astype(np.float32)).all() and np.abs(k.astype(np.float32)).max() == float(
            jnp.finfo(cache_format).max)
        out, cache = cache_values(out, cache_format), cache_values(cache, cache_format)
    rows, out, cache, k, v = (np.asarray(a, np.float32) for a in (rows, out, cache, k, v))
    tol = 1e-2 * np.abs(q).max()
    for t in range(4):
        for h in range(2):
            np.testing.assert_allclose(rows[h, first[t]:first[t] + group], q[t, h], atol=tol)
            for entry, want in ((out[LAYER, page[t], slot[t], 2 * h], k[t, h]),
                                (out[LAYER, page[t], slot[t], 2 * h + 1], v[t, h])):
                # 8-bit: a value at a rounding boundary may land one step (e5m2: 25%) from the reference's
                np.testing.assert_allclose(entry, want, rtol=0.26 if cache_format else 0,
                                           atol=1e-2 * np.abs(want).max())
    untouched = np.ones(cache.shape, bool)
    untouched[LAYER, page[:4], slot[:4]] = False
    np.testing.assert_array_equal(out[untouched], cache[untouched])  # nothing else, padding's page 4 included


@pytest.mark.parametrize("x_dtype,cache_dtype,head_dim", [
    (jnp.float32, jnp.float32, 64), (jnp.bfloat16, jnp.uint8, 64), (jnp.bfloat16, jnp.bfloat16, 96)])
def test_refuses_what_it_does_not_take(x_dtype, cache_dtype, head_dim):
    """float32, a byte cache without its 8-bit `cache_format`, a head dim whose half is not a power of two."""
    with pytest.raises(NotImplementedError, match="norm_rope_write needs 16-bit x and qkv, a cache of that dtype"):
        norm_rope_write(jnp.zeros((2, 64), x_dtype), jnp.zeros((2, 1, 3, head_dim), x_dtype),
                        (jnp.zeros((2, 1, head_dim // 2)),) * 2, jnp.zeros((1, 2, 16, 2, head_dim), cache_dtype), 0,
                        jnp.zeros((2, 4), jnp.int32), 16, 1e-5)


def test_model_uses_it_on_the_mosaic_gpu_path_and_computes_the_same(tmp_path, monkeypatch):
    """On the Mosaic GPU path a step of at most `FUSED_NORM_ROPE_ROWS` rows runs the norm, RoPE and K/V write as
    the kernel, inside the layer loop, and gives XLA's hidden states; larger steps keep XLA's."""
    make_tiny("llama", tmp_path, hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
              intermediate_size=256)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend="pallas_gpu").model
    assert model._fuses_norm_rope(FUSED_NORM_ROPE_ROWS) and not model._fuses_norm_rope(FUSED_NORM_ROPE_ROWS + 1)
    assert_fusion_matches_xla(model, monkeypatch, "_fuses_norm_rope", "norm_rope_write")

@pytest.mark.parametrize("backend,model_type,fused", [
    ("reference", "llama", False), ("pallas_gpu", "qwen3", False), ("pallas_gpu", "qwen2", False),
    ("pallas_gpu", "llama", True)])
def test_model_keeps_xla_where_the_kernel_does_not_apply(tmp_path, backend, model_type, fused):
    """The reference path (no folded norm scales), q/k norms and q/k/v biases keep XLA's norm and RoPE; an 8-bit
    cache does not."""
    make_tiny(model_type, tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend=backend).model
    model.kv_cache_format = "float8_e4m3fn"
    assert model._fuses_norm_rope(4) == fused

