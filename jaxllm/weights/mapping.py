"""Hugging Face tensor names and layouts -> jaxllm parameter paths and layouts.

Hugging Face stores linear weights as `[out, in]`; jaxllm keeps `[in, out]` with heads split out
(`q_proj [embed, q_heads, head_dim]`, `o_proj [q_heads, head_dim, embed]`) so that every axis has a
logical name to shard by. Per-layer tensors are stacked on the leading `layers` axis. Projections that
share an input and a sharding are one jaxllm parameter made of several Hugging Face tensors, stacked on a
new axis: `kv_proj [embed, 2, kv_heads, head_dim]` (k, v) and `gate_up_proj [embed, 2, mlp]` (gate, up).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxllm.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One jaxllm parameter: its Hugging Face tensor names (`{i}` for the layer), the layout change applied
    to each, and, where there are several, the axis they are stacked on."""

    path: Path
    hf_names: tuple[str, ...]
    transform: Callable[[np.ndarray, ModelConfig], np.ndarray]
    stack_axis: int | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_names[0]


def _rule(path: Path, hf_name: str, transform: Callable[[np.ndarray, ModelConfig], np.ndarray]) -> TensorRule:
    return TensorRule(path, (hf_name,), transform)


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
        _rule(("embed_tokens",), "model.embed_tokens.weight", _same),
        _rule(("norm",), "model.norm.weight", _same),
        _rule(("layers", "input_norm"), f"{layer}.input_layernorm.weight", _same),
        _rule(("layers", "post_attention_norm"), f"{layer}.post_attention_layernorm.weight", _same),
        _rule(("layers", "attn", "q_proj"), f"{attn}.q_proj.weight", _in_heads(_q_heads)),
        TensorRule(("layers", "attn", "kv_proj"), (f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                   _in_heads(_kv_heads), stack_axis=1),
        _rule(("layers", "attn", "o_proj"), f"{attn}.o_proj.weight", _out_heads),
        TensorRule(("layers", "mlp", "gate_up_proj"),
                   (f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"), _transpose, stack_axis=1),
        _rule(("layers", "mlp", "down_proj"), f"{layer}.mlp.down_proj.weight", _transpose),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_rule(("lm_head",), "lm_head.weight", _transpose))
    if cfg.qkv_bias:
        rules += [
            _rule(("layers", "attn", "q_bias"), f"{attn}.q_proj.bias", _bias_heads(_q_heads)),
            TensorRule(("layers", "attn", "kv_bias"), (f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
                       _bias_heads(_kv_heads), stack_axis=0),
        ]
    if cfg.o_bias:
        rules.append(_rule(("layers", "attn", "o_bias"), f"{attn}.o_proj.bias", _same))
    if cfg.qk_norm:
        rules += [
            _rule(("layers", "attn", "q_norm"), f"{attn}.q_norm.weight", _same),
            _rule(("layers", "attn", "k_norm"), f"{attn}.k_norm.weight", _same),
        ]
    return rules
