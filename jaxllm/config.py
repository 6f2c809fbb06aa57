"""Model configuration: the architecture-independent description every model is built from.

A `ModelConfig` is read from a Hugging Face `PretrainedConfig` (itself parsed by `transformers` from a
`config.json` or from GGUF metadata), so that every quirk of the config format is handled in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model jaxllm cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, after `transformers`' normalisation into `rope_parameters`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return _DTYPES[self.dtype]

    @property
    def sm_scale(self) -> float:
        return self.head_dim**-0.5

    @classmethod
    def from_hf(cls, hf_config: Any, dtype: str = "auto") -> "ModelConfig":
        """Build from a `transformers.PretrainedConfig`; raise `UnsupportedModelError` for what we can't run."""
        arch = _architecture(hf_config)
        hidden_act = getattr(hf_config, "hidden_act", "silu")
        if hidden_act != "silu":
            raise UnsupportedModelError(f"{arch}: hidden_act {hidden_act!r} is not supported (only 'silu')")
        if getattr(hf_config, "mlp_bias", False):
            raise UnsupportedModelError(f"{arch}: mlp_bias=True is not supported")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope=_rope_config(hf_config),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch in ("LlamaForCausalLM", "MistralForCausalLM") and attention_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(arch, hf_config),
            dtype=resolve_dtype(dtype, hf_config),
        )


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _architecture(hf_config: Any) -> str:
    """From `architectures`, or from `model_type` when the config names none (configs built from GGUF)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config.model_type]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise UnsupportedModelError(
        f"unsupported architecture {archs or '(none given)'}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_config(hf_config: Any) -> RopeConfig:
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")
    fields = {f.name for f in dataclasses.fields(RopeConfig)}
    extra = {k: v for k, v in params.items() if k in fields and k not in ("theta", "rope_type")}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **extra)


def _sliding_window(arch: str, hf_config: Any) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    if arch == "MistralForCausalLM":
        return int(window)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and getattr(hf_config, "use_sliding_window", False):
        layer_types = getattr(hf_config, "layer_types", None) or []
        if any(t != "sliding_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{arch}: sliding window on only some layers (max_window_layers) is not supported"
            )
        return int(window)
    return None


def resolve_dtype(dtype: str, hf_config: Any = None) -> str:
    """`auto` means the checkpoint's own dtype (float32 when it names none, as GGUF files do)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
        return dtype
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    return name if name in _DTYPES else "float32"
