"""jaxllm: an LLM inference and serving engine in JAX (Flax models, paged KV cache, Pallas attention)."""

from jaxllm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jaxllm.model_loader import LoadedModel, load_model, random_model
from jaxllm.parallel import ShardingRules, make_mesh

__version__ = "0.1.0"

__all__ = ["SUPPORTED_ARCHITECTURES", "LoadedModel", "ModelConfig", "ShardingRules", "load_model", "make_mesh",
           "random_model"]
