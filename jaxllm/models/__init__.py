"""Model registry: `config.json`'s `architectures` -> the Flax NNX class that runs it."""

from __future__ import annotations

from flax import nnx

from jaxllm.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from jaxllm.models.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 differ from Llama only in options that ModelConfig carries.
MODEL_CLASSES: dict[str, type[nnx.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig) -> type[nnx.Module]:
    """The class for `cfg.architecture`, or an error listing the supported ones."""
    try:
        return MODEL_CLASSES[cfg.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(MODEL_CLASSES)}") from None


__all__ = ["LlamaForCausalLM", "MODEL_CLASSES", "model_class"]
