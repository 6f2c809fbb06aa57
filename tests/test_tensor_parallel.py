"""Tensor parallelism on CPU virtual devices: tensor sizes 1, 2 and 4 give the same logits."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxllm.model_loader import load_model
from jaxllm.parallel import make_mesh
from tests.paged import PagedRunner
from tests.tiny_models import make_tiny

PROMPTS = {0: list(range(5, 30)), 1: [3, 4, 5, 6]}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tp-{request.param}")
    make_tiny(request.param, path)
    return path


def run(path, tp):
    mesh = make_mesh(tensor_parallel_size=tp)
    loaded = load_model(str(path), mesh=mesh)
    runner = PagedRunner(loaded.model, page_size=8, mesh=mesh)
    out = runner.step(dict(PROMPTS), pad_tokens=3)
    decode = runner.step({0: [11], 1: [12]})
    return loaded, runner, out, decode


def test_tensor_parallel_sizes_agree(checkpoint):
    assert len(jax.devices()) >= 4
    _, _, base, base_decode = run(checkpoint, 1)
    for tp in (2, 4):
        loaded, runner, out, decode = run(checkpoint, tp)
        for seq in PROMPTS:
            np.testing.assert_allclose(out[seq], base[seq], rtol=1e-5, atol=1e-5, err_msg=f"tp={tp}")
            np.testing.assert_allclose(decode[seq], base_decode[seq], rtol=1e-5, atol=1e-5)
        layers = loaded.model.layers
        # q, k and v grouped by the 2 KV heads: split over tensor 2, replicated over tensor 4; o_proj's 4 query
        # heads are split either way.
        qkv_spec = PartitionSpec(None, None, "tensor", None, None) if tp == 2 else PartitionSpec(*[None] * 5)
        assert layers.attn.qkv_proj[...].sharding.spec == qkv_spec
        assert layers.attn.o_proj[...].sharding.spec == PartitionSpec(None, "tensor", None, None)
        assert layers.mlp.down_proj[...].sharding.spec == PartitionSpec(None, "tensor", None)
        assert layers.mlp.gate_up_proj[...].sharding.spec == PartitionSpec(None, None, None, "tensor")
        # the cache's heads axis holds K and V of 2 heads: split in halves over tensor 2, whole over tensor 4.
        assert {s.data.shape[3] for s in runner.kv_cache.addressable_shards} == {2 if tp == 2 else 4}
        shard_shapes = {s.data.shape for s in layers.attn.qkv_proj[...].addressable_shards}
        assert shard_shapes == {(3, 64, 1 if tp == 2 else 2, 4, 16)}


def test_random_model_is_made_in_its_shardings():
    """Random weights (for benchmarks) are created sharded on the mesh, with the same values at any size."""
    from jaxllm.config import ModelConfig
    from jaxllm.model_loader import random_model
    from tests.tiny_models import COMMON, TINY

    config_cls, _, extra = TINY["qwen3"]
    cfg = ModelConfig.from_hf(config_cls(**COMMON, **extra, architectures=["Qwen3ForCausalLM"]), "bfloat16")
    single = random_model(cfg, make_mesh(1), seed=3)
    sharded = random_model(cfg, make_mesh(tensor_parallel_size=2), seed=3)
    qkv_proj = sharded.layers.attn.qkv_proj[...]
    assert qkv_proj.dtype == np.dtype("bfloat16")
    assert {s.data.shape for s in qkv_proj.addressable_shards} == {(3, 64, 1, 4, 32)}  # one of the 2 KV heads
    np.testing.assert_array_equal(np.asarray(qkv_proj, np.float32),
                                  np.asarray(single.layers.attn.qkv_proj[...], np.float32))
    out = PagedRunner(sharded, page_size=8, mesh=make_mesh(tensor_parallel_size=2)).step({0: [1, 2, 3]})
    assert np.isfinite(out[0]).all()


def test_kv_page_bytes_follow_the_cache_sharding(tmp_path):
    """The KV budget counts what a device really holds: its share of the heads, or all of them where the
    tensor size does not divide the KV heads (they are replicated then)."""
    from jaxllm.engine_config import EngineConfig
    from jaxllm.runner import ModelRunner

    make_tiny("llama", tmp_path)  # 2 KV heads of 16, 3 layers, float32
    per_page = 3 * 8 * 2 * 16 * 4  # layers x page x (K, V) x head_dim x bytes, per KV head
    for tp, heads_per_device in ((1, 2), (2, 1), (4, 2)):
        mesh = make_mesh(tensor_parallel_size=tp)
        runner = ModelRunner(EngineConfig(model=str(tmp_path), block_size=8, max_model_len=64,
                                          tensor_parallel_size=tp), load_model(str(tmp_path), mesh=mesh).model, mesh)
        assert runner.page_bytes_per_device() == heads_per_device * per_page, f"tp={tp}"
