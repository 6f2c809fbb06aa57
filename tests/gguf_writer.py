"""Write a tiny Llama GGUF from a transformers model, each weight in a chosen GGML type (as llama.cpp does:
Q/K rows permuted to interleaved rotary halves)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

T = gguf.GGMLQuantizationType


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (the inverse of `unpermute_qk`)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model, path: Path, types: dict[str, T]) -> dict[str, tuple[np.ndarray, T]]:
    """Save `model` (a transformers Llama) as GGUF; `types` maps a name fragment to a type (default F32).
    Returns each GGUF tensor's stored data and type, for checking the reader against `gguf`'s dequantizer."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if "q_proj" in hf_name:
            array = permute_qk(array, cfg.num_attention_heads)
        elif "k_proj" in hf_name:
            array = permute_qk(array, cfg.num_key_value_heads)
        qtype = next((t for fragment, t in types.items() if fragment in hf_name), T.F32) if array.ndim == 2 \
            else T.F32
        data = gguf.quants.quantize(array, qtype)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(name, data, raw_dtype=qtype)
        stored[name] = (data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
