"""jaxllm: an LLM inference and serving engine in JAX (Flax models, paged KV cache, Pallas attention)."""

from jaxllm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jaxllm.engine_config import EngineConfig
from jaxllm.llm import LLM
from jaxllm.llm_engine import LLMEngine
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.model_loader import LoadedModel, load_model, random_model
from jaxllm.parallel import ShardingRules, make_mesh

__version__ = "0.1.0"

__all__ = ["LLM", "SUPPORTED_ARCHITECTURES", "CompletionOutput", "EngineConfig", "LLMEngine", "LoadedModel",
           "Logprob", "ModelConfig", "RequestOutput", "RequestOutputKind", "SamplingParams", "ShardingRules",
           "load_model", "make_mesh", "random_model"]
