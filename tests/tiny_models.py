"""Tiny random Hugging Face checkpoints of every supported architecture, saved with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

TINY = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama3-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=7)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        head_dim=32, tie_word_embeddings=False)),
}


def make_tiny(name: str, path: Path, seed: int = 0, shard: bool = False,
              **overrides) -> transformers.PreTrainedModel:
    """Build, randomise (biases and norms too) and save a tiny model; returns the float32 torch model."""
    config_cls, model_cls, extra = TINY[name]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in pname:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return model
