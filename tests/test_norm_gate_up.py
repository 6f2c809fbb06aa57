"""The norm, gate/up and SiLU kernel (`pallas_kernels.norm_gate_up`, Pallas Triton, run by Pallas's interpreter on
CPU) against `rms_norm` and the products in float32, its contract errors, and where the model uses it: steps of
at most 16 rows on the Mosaic GPU path, the whole `gate_up_proj` stack read at the loop's counter.

Triton's lowering and the kernel's speed are checked on an H100 by `benchmarks/fused_mlp.py --norm` and the
decode benchmarks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model_loader import load_model
from jaxllm.models.layers import rms_norm
from pallas_kernels.norm_gate_up import Sizes, norm_gate_up
from tests.layer_loop import assert_fusion_matches_xla, loop_kernels, model_step
from tests.tiny_models import make_tiny


def expected(x: jax.Array, gate_up: jax.Array, layer: int, eps: float) -> np.ndarray:
    gu = jnp.einsum("te,eki->tki", rms_norm(x.astype(jnp.float32), None, eps), gate_up[layer].astype(jnp.float32))
    return np.asarray(jax.nn.silu(gu[:, 0]) * gu[:, 1])


@pytest.mark.parametrize("rows,embed,inter,dtype,sizes", [
    (1, 64, 96, jnp.bfloat16, None),  # I = 3 x 32: the blocks shrink to divide it
    (16, 128, 256, jnp.bfloat16, Sizes(block_i=64, block_k=32)),
    (5, 64, 128, jnp.float16, None),
])
def test_matches_the_norm_and_the_products(rows, embed, inter, dtype, sizes):
    keys = jax.random.split(jax.random.key(rows + inter), 2)
    gate_up = (jax.random.normal(keys[0], (3, embed, 2, inter)) * 0.1).astype(dtype)
    x = (jax.random.normal(keys[1], (rows, embed)) * 3).astype(dtype)
    out = norm_gate_up(x, gate_up, jnp.int32(2), 1e-5, sizes)
    assert out.shape == (rows, inter) and out.dtype == dtype
    want = expected(x, gate_up, 2, 1e-5)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("rows,dtype", [(17, jnp.bfloat16), (4, jnp.float32)])
def test_refuses_what_it_does_not_take(rows, dtype):
    with pytest.raises(NotImplementedError, match=r"norm_gate_up needs 16-bit x \[T <= 16, E\]"):
        norm_gate_up(jnp.zeros((rows, 64), dtype), jnp.zeros((2, 64, 2, 32), dtype), 0, 1e-5)


def test_model_uses_it_for_few_rows_on_the_mosaic_gpu_path(tmp_path, monkeypatch):
    """On the Mosaic GPU path a step of at most 16 rows runs the post-attention norm, gate/up and SiLU as the
    kernel, inside the layer loop, and computes what XLA's norm, GEMM and SiLU compute; 32 rows keep XLA's."""
    make_tiny("llama", tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              intermediate_size=256)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend="pallas_gpu").model
    for tokens, fused in ((4, True), (16, True), (32, False)):
        assert ("norm_gate_up" in loop_kernels(*model_step(model, tokens))) == fused
    assert_fusion_matches_xla(model, monkeypatch, "_fuses_norm_gate_up", "norm_gate_up")


def test_model_keeps_xla_on_the_reference_path(tmp_path):
    """The reference path never folds the norm scales, so it never fuses the norm into the kernel."""
    make_tiny("llama", tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend="reference").model
    assert not model._fuses_norm_gate_up(4)
