"""Loading checkpoints: what a Hugging Face directory brings, and errors that name the problem."""

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from jaxllm.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError, resolve_dtype
from jaxllm.model_loader import load_model
from jaxllm.weights.readers import CheckpointError
from tests.tiny_models import make_tiny


@pytest.fixture()
def checkpoint(tmp_path):
    make_tiny("llama", tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_lists_supported(checkpoint):
    _edit_config(checkpoint, architectures=["GPT2LMHeadModel"], model_type="llama")
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(checkpoint))
    assert "GPT2LMHeadModel" in str(err.value)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)


def test_missing_tensor_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(checkpoint))


def test_shape_disagreeing_with_config_is_named(checkpoint):
    _edit_config(checkpoint, intermediate_size=128)
    with pytest.raises(CheckpointError, match="gate_proj"):
        load_model(str(checkpoint))


@pytest.mark.parametrize("resize", ["one row short", "twice the rows"])
def test_wrong_shape_in_a_joined_parameter_names_that_tensor(checkpoint, resize):
    """q, k and v are one parameter (`qkv_proj`); a v_proj of the wrong shape is named, not its partners, whether
    its rows fit no grouping or would group into more than one head per KV head."""
    tensors = load_file(checkpoint / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.weight"
    v = tensors[name]
    tensors[name] = v[:-1] if resize == "one row short" else np.concatenate([v, v])
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.v_proj\.weight' has shape "
                                              r".*\(layers\.attn\.qkv_proj needs \(\d+, \d+, 1, \d+\) per layer"):
        load_model(str(checkpoint))


def test_corrupt_safetensors_names_the_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(str(checkpoint))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_model_name():
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct"):
        load_model("no-such/model")


def test_unsupported_options_are_refused():
    config = transformers.LlamaConfig(hidden_act="gelu", architectures=["LlamaForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_hf(config)
    config = transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                                      architectures=["LlamaForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf(config)


def test_dtype_resolution():
    config = transformers.LlamaConfig(dtype="bfloat16")
    assert resolve_dtype("auto", config) == "bfloat16"
    assert resolve_dtype("auto", transformers.LlamaConfig()) == "float32"
    assert resolve_dtype("float32", config) == "float32"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", config)


def test_qwen2_sliding_window_is_per_config():
    base = dict(architectures=["Qwen2ForCausalLM"], sliding_window=64, num_hidden_layers=2)
    assert ModelConfig.from_hf(transformers.Qwen2Config(**base)).sliding_window is None
    on = transformers.Qwen2Config(**base, use_sliding_window=True, max_window_layers=0)
    assert ModelConfig.from_hf(on).sliding_window == 64


def test_hf_directory_tokenizer_and_generation_config(checkpoint):
    """A Hugging Face directory brings its own tokenizer files and generation_config.json."""
    from transformers import GenerationConfig

    from jaxllm.weights.sources import (
        DEFAULT_MODEL,
        load_generation_config,
        load_hf_config,
        load_tokenizer,
        resolve_source,
    )

    load_tokenizer(resolve_source(DEFAULT_MODEL)).save_pretrained(checkpoint)
    GenerationConfig(eos_token_id=2, temperature=0.7, do_sample=True).save_pretrained(checkpoint)
    source = resolve_source(str(checkpoint))
    tokenizer = load_tokenizer(source)
    assert tokenizer.decode(tokenizer.encode("Paris, France")) == "Paris, France"
    assert load_generation_config(source, load_hf_config(source)).temperature == 0.7
