"""Checkpoint conversion: Hugging Face and GGUF checkpoints to jaxllm model directories (orbax)."""

from conversion.convert import Plan, convert, plan

__all__ = ["Plan", "convert", "plan"]
