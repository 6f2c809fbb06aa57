"""Build a model on a mesh: weights from a checkpoint (or random), each placed straight into its sharding.

The model is first created abstractly (`nnx.eval_shape`, no memory), so every parameter's shape and
logical axes are known before a byte is read; each checkpoint tensor is checked against that shape and
`device_put` with the sharding the rules table gives its logical axes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm
from transformers import PretrainedConfig

from jaxllm.config import ModelConfig
from jaxllm.models import model_class
from jaxllm.parallel import ShardingRules, make_mesh, named_sharding
from jaxllm.weights.mapping import TensorRule, tensor_rules
from jaxllm.weights.readers import CheckpointError, GGUFReader, SafetensorsReader, TensorReader
from jaxllm.weights.sources import ModelSource, load_hf_config, resolve_source

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """A ready model and what it was made from."""

    model: nnx.Module
    config: ModelConfig
    mesh: Mesh
    hf_config: PretrainedConfig | None = None
    source: ModelSource | None = None


def abstract_model(cfg: ModelConfig, attention_backend: str = "auto") -> nnx.Module:
    """The model with shapes and metadata but no arrays."""
    cls = model_class(cfg)
    return nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), attention_backend=attention_backend))


def param_shardings(model: nnx.Module, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """The `NamedSharding` of every parameter, from its logical axes."""
    state = nnx.state(model)
    return jax.tree.map(lambda v: named_sharding(v.shape, v.logical_axes, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def load_model(model: str, dtype: str = "auto", mesh: Mesh | None = None,
               rules: ShardingRules = ShardingRules(), attention_backend: str = "auto") -> LoadedModel:
    """Load a Hugging Face directory, a GGUF file or a known model name onto `mesh` (one device by default)."""
    source = resolve_source(model)
    hf_config = load_hf_config(source)
    cfg = ModelConfig.from_hf(hf_config, dtype)
    mesh = mesh or make_mesh()
    reader = open_reader(source, cfg)
    abstract = abstract_model(cfg, attention_backend)
    built = _fill(abstract, lambda rule: read_tensor(reader, rule, cfg), mesh, rules, cfg)
    logger.info("loaded %s (%s, %s) from %s", cfg.architecture, cfg.dtype, _count(built), source.path)
    return LoadedModel(built, cfg, mesh, hf_config, source)


def random_model(cfg: ModelConfig, mesh: Mesh | None = None, rules: ShardingRules = ShardingRules(),
                 seed: int = 0, attention_backend: str = "auto") -> nnx.Module:
    """A model with random weights created directly in their shardings on the devices (for benchmarks)."""
    mesh = mesh or make_mesh()
    abstract = abstract_model(cfg, attention_backend)
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh, rules)

    @jax.jit
    def init():
        state = nnx.state(model_class(cfg)(cfg, nnx.Rngs(seed), attention_backend=attention_backend))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())


def open_reader(source: ModelSource, cfg: ModelConfig) -> TensorReader:
    if source.kind == "gguf":
        return GGUFReader(source.path, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    return SafetensorsReader(source.path)


def read_tensor(reader: TensorReader, rule: TensorRule, cfg: ModelConfig) -> np.ndarray:
    """One parameter in jaxllm layout; per-layer tensors stacked on the `layers` axis."""
    names = [rule.hf_name.format(i=i) for i in range(cfg.num_layers)] if rule.per_layer else [rule.hf_name]
    parts = []
    for name in names:
        try:
            parts.append(rule.transform(reader.get(name), cfg))
        except KeyError:
            raise CheckpointError(f"checkpoint has no tensor {name!r} (needed for {'.'.join(rule.path)})") from None
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"tensor {name!r} does not fit the config: {e}") from e
    return np.stack(parts) if rule.per_layer else parts[0]


def _fill(abstract: nnx.Module, read: Callable[[TensorRule], np.ndarray], mesh: Mesh, rules: ShardingRules,
          cfg: ModelConfig) -> nnx.Module:
    """Read every parameter, check its shape, and place it in its sharding."""
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    for rule in tqdm(tensor_rules(cfg), desc="loading weights", unit="tensor", leave=False):
        var = variables.pop(rule.path)
        array = read(rule)
        if array.shape != var.shape:
            raise CheckpointError(f"tensor for {'.'.join(rule.path)} ({rule.hf_name}) has shape {array.shape}, "
                                  f"the config implies {var.shape}")
        sharding: NamedSharding = named_sharding(var.shape, var.logical_axes, mesh, rules)
        var.set_value(jax.device_put(array.astype(var.dtype), sharding))
    if variables:
        raise CheckpointError(f"no checkpoint rule for parameters {sorted('.'.join(p) for p in variables)}")
    return nnx.merge(graphdef, state)


def _count(model: nnx.Module) -> str:
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    return f"{n / 1e6:.1f}M parameters"
