"""tpu_configs/: every slice config loads as `jaxllm serve --config` loads it, its mesh fits its chips (on CPU
virtual devices), its values sit within the engine's and the TPU kernel's limits, and the models it lists fit
in its memory by the arithmetic of jaxllm/tpu_slices.py, which docs/tpu.md's tables must match."""

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm import tpu_slices
from jaxllm.cli import build_parser
from jaxllm.engine_config import MIN_TOKEN_BUCKET, EngineConfig
from jaxllm.model_loader import abstract_model
from jaxllm.parallel import ShardingRules, kv_cache_sharding, make_mesh, named_sharding
from pallas_kernels import kv_cache_shape
from pallas_kernels import tpu as tpu_kernel
from serving import server
from tests.test_pallas_tpu import run_kernel

ROOT = Path(__file__).resolve().parents[1]
SLICES = ("v5e-1", "v5e-4", "v5e-8", "v6e-1", "v6e-4", "v6e-8", "v5p-8")
PATHS = sorted((ROOT / "tpu_configs").glob("*.yaml"))
CONFIGS = {path.stem: tpu_slices.load(path) for path in PATHS}
ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]
REQUIRED = ("tensor_parallel_size", "dtype", "block_size", "max_model_len", "max_num_batched_tokens",
            "max_num_seqs", "gpu_memory_utilization")
# Parameter counts the model cards publish.
PUBLISHED = {"meta-llama/Llama-3.2-1B-Instruct": 1.24e9, "meta-llama/Llama-3.2-3B-Instruct": 3.21e9,
             "meta-llama/Llama-3.1-8B-Instruct": 8.03e9, "meta-llama/Llama-3.1-70B-Instruct": 70.6e9,
             "Qwen/Qwen2.5-7B-Instruct": 7.61e9, "Qwen/Qwen2.5-32B-Instruct": 32.5e9,
             "Qwen/Qwen2.5-72B-Instruct": 72.7e9}


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def test_one_config_per_slice():
    assert sorted(CONFIGS) == sorted(SLICES)
    for name, config in CONFIGS.items():
        assert config.tpu.accelerator_type == name


@pytest.mark.parametrize("name", SLICES)
def test_mesh_matches_the_chip_count(name):
    config = CONFIGS[name]
    tensor, pipeline = config.engine["tensor_parallel_size"], config.engine.get("pipeline_parallel_size", 1)
    assert tensor * pipeline == config.tpu.chips
    mesh = make_mesh(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
    assert mesh.devices.size == config.tpu.chips == len(set(mesh.devices.flat))
    assert dict(mesh.shape) == {"data": 1, "pipeline": pipeline, "tensor": tensor}


@pytest.mark.parametrize("name", SLICES)
def test_serve_accepts_the_file(name):
    path = str(ROOT / "tpu_configs" / f"{name}.yaml")
    args = build_parser().parse_args(["serve", "/models/x", "--config", path, "--max-num-seqs", "8"])
    values = server.settings(args, ENGINE_FIELDS)
    engine = server.build_engine_config(values, ENGINE_FIELDS)
    expected = {**CONFIGS[name].engine, "max_num_seqs": 8}  # the command line wins over the file
    assert {key: getattr(engine, key) for key in expected} == expected
    assert engine.model == "/models/x"


@pytest.mark.parametrize("name", SLICES)
def test_values_within_the_engines_limits(name):
    engine = CONFIGS[name].engine
    assert set(REQUIRED) <= set(engine), "slice configs spell out every sizing setting"
    config = EngineConfig(**engine)  # the engine's own validation
    assert config.dtype == "bfloat16"
    assert config.max_num_seqs <= config.max_num_batched_tokens
    assert _power_of_two(config.max_num_seqs) and _power_of_two(config.max_num_batched_tokens)
    assert config.max_num_batched_tokens >= MIN_TOKEN_BUCKET
    buckets = config.token_buckets()
    assert all(_power_of_two(b) for b in buckets) and buckets[-1] == config.max_num_batched_tokens
    assert all(config.seq_bucket(b) <= b for b in buckets)
    assert _power_of_two(config.block_size) and config.max_model_len % config.block_size == 0


@pytest.mark.parametrize("name", SLICES)
def test_attention_block_sizes_reach_the_engine(name):
    """Each file's kernel block sizes are a valid `BlockSizes` of the Mosaic TPU kernel (starting from the
    kernel's own entry for the chip), whole pages per KV block, and become the engine's setting."""
    config, page = CONFIGS[name], CONFIGS[name].engine["block_size"]
    sizes = tpu_kernel.BlockSizes(**config.engine["attention_block_sizes"])
    assert sizes == tpu_kernel.BLOCK_SIZES[config.tpu.generation]
    assert sizes.block_kv_tokens % page == 0, "a KV block must be whole pages"
    assert _power_of_two(sizes.block_q)
    path = str(ROOT / "tpu_configs" / f"{name}.yaml")
    engine_config = server.build_engine_config(server.load_config(path, ENGINE_FIELDS), ENGINE_FIELDS)
    assert engine_config.attention_block_sizes == config.engine["attention_block_sizes"]


@pytest.mark.parametrize("block_q,block_kv,page", sorted({
    (c.engine["attention_block_sizes"]["block_q"], c.engine["attention_block_sizes"]["block_kv_tokens"],
     c.engine["block_size"])
    for c in CONFIGS.values()}))
def test_kernel_runs_with_the_slice_block_and_page_sizes(block_q, block_kv, page):
    """The interpreted Mosaic kernel with each file's block and page sizes: several query chunks and KV blocks."""
    out, expected, n = run_kernel([block_q + 5, 1, 3], [2 * block_kv + 40, block_kv + 1, 9], 4, 2, 128, page, None,
                                  None, sizes=tpu_kernel.BlockSizes(block_q, block_kv))
    np.testing.assert_allclose(out[:n], expected[:n], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", SLICES)
def test_suited_models_split_evenly_and_fit(name):
    config = CONFIGS[name]
    tensor = config.engine["tensor_parallel_size"]
    assert config.tpu.models
    for model_name in config.tpu.models:
        model = tpu_slices.MODELS[model_name]
        assert model.num_heads % tensor == 0 and model.num_kv_heads % tensor == 0, (model_name, "heads replicated")
        assert config.engine["max_model_len"] <= model.max_position_embeddings
        plan = tpu_slices.plan(model, config)
        assert plan.fits, f"{model_name} on {name}: weights + one {plan.max_model_len}-token sequence do not fit"


@pytest.mark.parametrize("model_name,tensor", [("meta-llama/Llama-3.1-8B-Instruct", 8),
                                               ("meta-llama/Llama-3.2-1B-Instruct", 4),
                                               ("Qwen/Qwen2.5-7B-Instruct", 8)])  # 28 heads: replicated on 8
def test_per_chip_bytes_match_the_engines_shardings(model_name, tensor):
    model, rules = tpu_slices.MODELS[model_name], ShardingRules()
    mesh = make_mesh(tensor_parallel_size=tensor)
    variables = jax.tree.leaves(nnx.state(abstract_model(model, attention_backend="reference")),
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharded = sum(math.prod(named_sharding(v.shape, v.logical_axes, mesh, rules).shard_shape(v.shape)) * 2
                  for v in variables)
    assert tpu_slices.weight_bytes(model, tpu_slices.abstract_mesh(tensor)) == sharded
    shape = kv_cache_shape(model.num_layers, 1, 16, model.num_kv_heads, model.head_dim)
    per_page = math.prod(kv_cache_sharding(shape, mesh, rules).shard_shape(shape)) * 2
    assert tpu_slices.kv_bytes_per_token(model, tpu_slices.abstract_mesh(tensor)) * 16 == per_page


@pytest.mark.parametrize("model_name", sorted(PUBLISHED))
def test_model_shapes_give_the_published_parameter_counts(model_name):
    parameters = tpu_slices.weight_bytes(tpu_slices.MODELS[model_name], tpu_slices.abstract_mesh(1)) / 2
    assert parameters == pytest.approx(PUBLISHED[model_name], rel=0.01)


def test_workspace_estimate_covers_xlas_measurement():
    """docs/performance.md: XLA counted 1.71 GiB for Llama-3.1-8B, 2048 tokens, 256 sequences, one H200."""
    estimate = tpu_slices.workspace_bytes(tpu_slices.MODELS["meta-llama/Llama-3.1-8B-Instruct"], 1, 2048, 256)
    assert (estimate - 512 * tpu_slices.MIB) / 1.2 >= 1.71 * tpu_slices.GIB


def test_where_70b_fits():
    model = tpu_slices.MODELS["meta-llama/Llama-3.1-70B-Instruct"]
    fits = {name for name, config in CONFIGS.items() if tpu_slices.plan(model, config).fits}
    assert fits == {"v6e-8", "v5p-8"}


def test_docs_tables_are_current():
    """Regenerate with `python -m jaxllm.tpu_slices tpu_configs/*.yaml`."""
    docs = (ROOT / "docs" / "tpu.md").read_text()
    configs = sorted(CONFIGS.values(), key=tpu_slices.slice_order)
    for model_name in tpu_slices.TABLE_MODELS:
        assert tpu_slices.markdown_table(configs, model_name) in docs


@pytest.mark.parametrize("text,message", [
    ("max_num_seq: 8\n", "unknown setting max_num_seq"),
    ("tpu:\n  chip: 8\n", "tpu.chip: unknown key"),
    ("tpu: [v6e-8]\n", "tpu: expected a mapping"),
])
def test_loader_names_the_bad_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        server.load_config(str(path), ENGINE_FIELDS)


def test_loader_checks_the_tpu_section_against_the_slice(tmp_path):
    text = (ROOT / "tpu_configs" / "v5p-8.yaml").read_text().replace("chips: 4", "chips: 8")
    path = tmp_path / "v5p-8.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="tpu.chips: v5p-8 has 4 chips"):
        server.load_config(str(path), ENGINE_FIELDS)
