"""Hugging Face tensor names and layouts -> jaxllm parameter paths and layouts.

Hugging Face stores linear weights as `[out, in]`; jaxllm keeps `[in, out]` with heads split out
(`q_proj [embed, q_heads, head_dim]`, `o_proj [q_heads, head_dim, embed]`) so that every axis has a
logical name to shard by. Per-layer tensors are stacked on the leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxllm.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One jaxllm parameter: its Hugging Face name (`{i}` for the layer) and the layout change."""

    path: Path
    hf_name: str
    transform: Callable[[np.ndarray, ModelConfig], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _same(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w


def _transpose(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w.T


def _in_heads(num_heads: Callable[[ModelConfig], int]) -> Callable[[np.ndarray, ModelConfig], np.ndarray]:
    """`[heads*D, E]` -> `[E, heads, D]`."""
    return lambda w, cfg: w.T.reshape(cfg.hidden_size, num_heads(cfg), cfg.head_dim)


def _bias_heads(num_heads: Callable[[ModelConfig], int]) -> Callable[[np.ndarray, ModelConfig], np.ndarray]:
    return lambda w, cfg: w.reshape(num_heads(cfg), cfg.head_dim)


def _out_heads(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """`[E, H*D]` -> `[H, D, E]`."""
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _q_heads(cfg: ModelConfig) -> int:
    return cfg.num_heads


def _kv_heads(cfg: ModelConfig) -> int:
    return cfg.num_kv_heads


def tensor_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Every parameter of a Llama-family model and where its value comes from."""
    layer, attn = "model.layers.{i}", "model.layers.{i}.self_attn"
    rules = [
        TensorRule(("embed_tokens",), "model.embed_tokens.weight", _same),
        TensorRule(("norm",), "model.norm.weight", _same),
        TensorRule(("layers", "input_norm"), f"{layer}.input_layernorm.weight", _same),
        TensorRule(("layers", "post_attention_norm"), f"{layer}.post_attention_layernorm.weight", _same),
        TensorRule(("layers", "attn", "q_proj"), f"{attn}.q_proj.weight", _in_heads(_q_heads)),
        TensorRule(("layers", "attn", "k_proj"), f"{attn}.k_proj.weight", _in_heads(_kv_heads)),
        TensorRule(("layers", "attn", "v_proj"), f"{attn}.v_proj.weight", _in_heads(_kv_heads)),
        TensorRule(("layers", "attn", "o_proj"), f"{attn}.o_proj.weight", _out_heads),
        TensorRule(("layers", "mlp", "gate_proj"), f"{layer}.mlp.gate_proj.weight", _transpose),
        TensorRule(("layers", "mlp", "up_proj"), f"{layer}.mlp.up_proj.weight", _transpose),
        TensorRule(("layers", "mlp", "down_proj"), f"{layer}.mlp.down_proj.weight", _transpose),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule(("lm_head",), "lm_head.weight", _transpose))
    if cfg.qkv_bias:
        rules += [
            TensorRule(("layers", "attn", "q_bias"), f"{attn}.q_proj.bias", _bias_heads(_q_heads)),
            TensorRule(("layers", "attn", "k_bias"), f"{attn}.k_proj.bias", _bias_heads(_kv_heads)),
            TensorRule(("layers", "attn", "v_bias"), f"{attn}.v_proj.bias", _bias_heads(_kv_heads)),
        ]
    if cfg.o_bias:
        rules.append(TensorRule(("layers", "attn", "o_bias"), f"{attn}.o_proj.bias", _same))
    if cfg.qk_norm:
        rules += [
            TensorRule(("layers", "attn", "q_norm"), f"{attn}.q_norm.weight", _same),
            TensorRule(("layers", "attn", "k_norm"), f"{attn}.k_norm.weight", _same),
        ]
    return rules
