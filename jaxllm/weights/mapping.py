"""Hugging Face tensor names and layouts -> jaxllm parameter paths and layouts.

Hugging Face stores linear weights as `[out, in]`; jaxllm keeps `[in, out]` with heads split out
(`o_proj [q_heads, head_dim, embed]`) so that every axis has a logical name to shard by. Per-layer tensors are
stacked on the leading `layers` axis. Projections that share an input are one jaxllm parameter made of several
Hugging Face tensors, so that one GEMM computes them: `gate_up_proj [embed, 2, mlp]` (gate and up stacked on a
new axis) and `qkv_proj [embed, kv_heads, G + 2, head_dim]`, q, k and v grouped by KV head (each KV head's G
query heads, then its k and its v, joined on the group axis), so that tensor parallelism splits it by whole KV
heads as it splits the cache.
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
    to each, and, where there are several, the new axis they are stacked on (`stack_axis`, equal shapes) or the
    existing axis they are joined along (`join_axis`, each tensor's size on it given by `join_sizes`)."""

    path: Path
    hf_names: tuple[str, ...]
    transform: Callable[[np.ndarray, ModelConfig], np.ndarray]
    stack_axis: int | None = None
    join_axis: int | None = None
    join_sizes: Callable[[ModelConfig], tuple[int, ...]] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_names[0]


def _rule(path: Path, hf_name: str, transform: Callable[[np.ndarray, ModelConfig], np.ndarray]) -> TensorRule:
    return TensorRule(path, (hf_name,), transform)


def _same(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w


def _transpose(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w.T


def _in_groups(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """`[heads*D, E]` -> `[E, kv_heads, heads/kv_heads, D]`: query head h belongs to KV head h // G."""
    return w.T.reshape(cfg.hidden_size, cfg.num_kv_heads, -1, cfg.head_dim)


def _bias_groups(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """`[heads*D]` -> `[kv_heads, heads/kv_heads, D]`."""
    return w.reshape(cfg.num_kv_heads, -1, cfg.head_dim)


def _qkv_sizes(cfg: ModelConfig) -> tuple[int, ...]:
    return cfg.num_heads // cfg.num_kv_heads, 1, 1


def _out_heads(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """`[E, H*D]` -> `[H, D, E]`."""
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def tensor_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Every parameter of a Llama-family model and where its value comes from."""
    layer, attn = "model.layers.{i}", "model.layers.{i}.self_attn"
    rules = [
        _rule(("embed_tokens",), "model.embed_tokens.weight", _same),
        _rule(("norm",), "model.norm.weight", _same),
        _rule(("layers", "input_norm"), f"{layer}.input_layernorm.weight", _same),
        _rule(("layers", "post_attention_norm"), f"{layer}.post_attention_layernorm.weight", _same),
        TensorRule(("layers", "attn", "qkv_proj"), tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), _in_groups,
                   join_axis=2, join_sizes=_qkv_sizes),
        _rule(("layers", "attn", "o_proj"), f"{attn}.o_proj.weight", _out_heads),
        TensorRule(("layers", "mlp", "gate_up_proj"),
                   (f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"), _transpose, stack_axis=1),
        _rule(("layers", "mlp", "down_proj"), f"{layer}.mlp.down_proj.weight", _transpose),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_rule(("lm_head",), "lm_head.weight", _transpose))
    if cfg.qkv_bias:
        rules += [
            TensorRule(("layers", "attn", "qkv_bias"), tuple(f"{attn}.{p}_proj.bias" for p in "qkv"), _bias_groups,
                       join_axis=1, join_sizes=_qkv_sizes),
        ]
    if cfg.o_bias:
        rules.append(_rule(("layers", "attn", "o_bias"), f"{attn}.o_proj.bias", _same))
    if cfg.qk_norm:
        rules += [
            _rule(("layers", "attn", "q_norm"), f"{attn}.q_norm.weight", _same),
            _rule(("layers", "attn", "k_norm"), f"{attn}.k_norm.weight", _same),
        ]
    return rules
