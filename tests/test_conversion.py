"""`jaxllm convert`: every architecture round-trips to transformers' logits, GGUF tensor types dequantize as
the `gguf` package does, converted directories restore sharded, and bad input gets a message."""

import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conversion import convert
from jaxllm.cli import main
from jaxllm.model_loader import load_model
from jaxllm.parallel import make_mesh
from jaxllm.weights.model_dir import Manifest
from jaxllm.weights.readers import GGUFReader, unpermute_qk
from jaxllm.weights.sources import DEFAULT_MODEL, load_generation_config, load_tokenizer, resolve_source
from tests.engine_fixtures import hf_greedy, hf_smollm2
from tests.gguf_writer import T, write_llama_gguf
from tests.paged import PagedRunner
from tests.tiny_models import TINY, make_tiny

PROMPT = list(range(3, 30))


def logits(model_dir, mesh=None):
    loaded = load_model(str(model_dir), mesh=mesh)
    return PagedRunner(loaded.model, page_size=8, mesh=mesh).step({0: PROMPT})[0], loaded


@pytest.mark.parametrize("arch", sorted(TINY))
def test_converted_architectures_match_transformers(arch, tmp_path):
    hf = make_tiny(arch, tmp_path / "src", shard=arch == "llama")
    convert(str(tmp_path / "src"), tmp_path / "out")
    ours, loaded = logits(tmp_path / "out")
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert loaded.source.kind == "jaxllm"
    manifest = Manifest.read(tmp_path / "out")
    assert (manifest.architecture, manifest.dtype) == (loaded.config.architecture, "float32")
    assert len(manifest.source_sha256) == 64


def test_directory_of_an_older_format_asks_for_a_new_conversion(tmp_path):
    """Format 3 joins q, k and v; a directory of an older format (2: k/v stacked, q apart) is refused with what
    to do, not a tree error."""
    make_tiny("llama", tmp_path / "src")
    convert(str(tmp_path / "src"), tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "jaxllm.json").read_text())
    (tmp_path / "out" / "jaxllm.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match="format version 2 is not 3; convert the model again"):
        load_model(str(tmp_path / "out"))


def test_bfloat16_conversion(tmp_path):
    make_tiny("qwen3", tmp_path / "src")
    convert(str(tmp_path / "src"), tmp_path / "out", dtype="bfloat16")
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(__import__("flax").nnx.state(loaded.model))} == {np.dtype("bfloat16")}


def test_smollm2_gguf_converts_to_the_same_greedy_answer(tmp_path):
    out = tmp_path / "smollm2"
    main(["convert", DEFAULT_MODEL, str(out)])
    tokenizer = load_tokenizer(resolve_source(str(out)))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    source = resolve_source(str(out))
    assert load_generation_config(source, None).eos_token_id == 2
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        tokenize=False), add_special_tokens=False)
    runner = PagedRunner(load_model(str(out)).model, page_size=16)
    tokens, logits_ = [], runner.step({0: prompt})[0]
    while len(tokens) < 16 and (not tokens or tokens[-1] != 2):
        tokens.append(int(logits_[-1].argmax()))
        logits_ = runner.step({0: tokens[-1:]})[0]
    assert tokens == hf_greedy(hf_smollm2(), prompt, 16, 2)
    assert tokenizer.decode(tokens, skip_special_tokens=True) == "The capital of France is Paris."


GGUF_TYPES = {"q_proj": T.Q4_0, "k_proj": T.Q8_0, "v_proj": T.F16, "o_proj": T.BF16, "gate_proj": T.Q4_1,
              "up_proj": T.Q4_0, "embed": T.Q8_0}


def test_gguf_types_dequantize_as_the_gguf_package_does(tmp_path):
    """Q4_0, Q4_1, Q8_0, F16, BF16, F32 (the K-quants cannot be written by gguf 0.19, only read)."""
    hf = make_tiny("llama", tmp_path / "hf")
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    stored = write_llama_gguf(hf, path, GGUF_TYPES)
    assert {t for _, t in stored.values()} == {T.Q4_0, T.Q4_1, T.Q8_0, T.F16, T.BF16, T.F32}
    cfg = hf.config
    reader = GGUFReader(path, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    for hf_name in hf.state_dict():
        data, qtype = stored[reader.gguf_name(hf_name)]
        expected = gguf.quants.dequantize(data, qtype)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            expected = unpermute_qk(expected, cfg.num_attention_heads if "q_proj" in hf_name
                                    else cfg.num_key_value_heads)
        np.testing.assert_array_equal(reader.get(hf_name), expected, err_msg=hf_name)
    # End to end: our load of the GGUF, and of its conversion, equal transformers' load of the same file.
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0].numpy()
    np.testing.assert_allclose(logits(path)[0], ref, rtol=1e-4, atol=1e-5)


def test_converted_directory_restores_under_tensor_parallelism(tmp_path):
    make_tiny("qwen2", tmp_path / "src")
    convert(str(tmp_path / "src"), tmp_path / "out")
    single, _ = logits(tmp_path / "out")
    mesh = make_mesh(tensor_parallel_size=2)
    sharded, loaded = logits(tmp_path / "out", mesh)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
    qkv_proj = loaded.model.layers.attn.qkv_proj[...]
    assert {s.data.shape for s in qkv_proj.addressable_shards} == {(3, 64, 1, 4, 16)}  # each device: 1 of 2 KV heads
    assert len(qkv_proj.addressable_shards) == 2


# ----- bad input: a message naming the problem, a non-zero exit, nothing left behind -----

def run_cli(*args):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *map(str, args)])
    return str(exit_info.value.code)


def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_config(tmp_path):
    (tmp_path / "src").mkdir()
    assert "no config.json" in run_cli(tmp_path / "src", tmp_path / "out")


def test_unsupported_architecture_lists_supported(tmp_path):
    make_tiny("llama", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    message = run_cli(tmp_path / "src", tmp_path / "out")
    assert "FalconForCausalLM" in message and "Qwen3ForCausalLM" in message
    assert_nothing_left(tmp_path / "out")


def test_truncated_safetensors_names_the_file(tmp_path):
    make_tiny("llama", tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    message = run_cli(tmp_path / "src", tmp_path / "out")
    assert "model.safetensors" in message
    assert_nothing_left(tmp_path / "out")


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(resolve_source(DEFAULT_MODEL).path.read_bytes()[:1_000_000])
    message = run_cli(bad, tmp_path / "out")
    assert "broken.gguf" in message
    assert_nothing_left(tmp_path / "out")


def test_shape_disagreeing_with_config_names_the_tensor(tmp_path):
    make_tiny("llama", tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.2.mlp.down_proj.weight"][:, :64]
    save_file(tensors, weights, metadata={"format": "pt"})
    message = run_cli(tmp_path / "src", tmp_path / "out")
    assert "model.layers.2.mlp.down_proj.weight" in message
    assert_nothing_left(tmp_path / "out")  # failed on the last layer's tensor: still nothing half-written


def test_existing_output_needs_overwrite(tmp_path):
    make_tiny("llama", tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "--overwrite" in run_cli(tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--overwrite"])
    assert Manifest.read(tmp_path / "out").architecture == "LlamaForCausalLM"


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    make_tiny("qwen3", tmp_path / "src")
    main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--dry-run", "--dtype", "bfloat16"])
    printed = capsys.readouterr().out
    for expected in ("Qwen3ForCausalLM", "bfloat16", "parameters", "bytes"):
        assert expected in printed
    assert_nothing_left(tmp_path / "out")
