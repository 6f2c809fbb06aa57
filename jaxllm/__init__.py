"""jaxllm: an LLM inference and serving engine in JAX (Flax models, paged KV cache, Pallas attention)."""

from jaxllm.logging_setup import configure_logging
from jaxllm.xla_flags import apply_defaults

configure_logging()
apply_defaults()

from jaxllm.config import SUPPORTED_ARCHITECTURES, ModelConfig  # noqa: E402
from jaxllm.engine_config import EngineConfig  # noqa: E402
from jaxllm.llm import LLM  # noqa: E402
from jaxllm.llm_engine import LLMEngine  # noqa: E402
from jaxllm.model_loader import LoadedModel, load_model, random_model  # noqa: E402
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from jaxllm.parallel import ShardingRules, make_mesh  # noqa: E402
from jaxllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402

__version__ = "0.1.0"

__all__ = ["LLM", "SUPPORTED_ARCHITECTURES", "CompletionOutput", "EngineConfig", "LLMEngine", "LoadedModel",
           "Logprob", "ModelConfig", "RequestOutput", "RequestOutputKind", "SamplingParams", "ShardingRules",
           "load_model", "make_mesh", "random_model"]
