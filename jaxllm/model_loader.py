"""Build a model on a mesh: weights from a checkpoint (or random), each placed straight into its sharding.

The model is first created abstractly (`nnx.eval_shape`, no memory), so every parameter's shape and
logical axes are known before a byte is read; each checkpoint tensor is checked against that shape and
`device_put` with the sharding the rules table gives its logical axes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm
from transformers import PretrainedConfig

from jaxllm.config import ModelConfig
from jaxllm.models import model_class
from jaxllm.models.quantization import check_method, quantize_model
from jaxllm.parallel import ShardingRules, make_mesh, named_sharding
from jaxllm.weights.mapping import TensorRule, tensor_rules
from jaxllm.weights.model_dir import PARAMS_DIR, Manifest
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


def abstract_model(cfg: ModelConfig, attention_backend: str = "auto", pipeline_stages: int = 1,
                   attention_block_sizes: dict[str, int] | None = None) -> nnx.Module:
    """The model with shapes and metadata but no arrays."""
    cls = model_class(cfg)
    return nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), attention_backend=attention_backend,
                                      pipeline_stages=pipeline_stages, attention_block_sizes=attention_block_sizes))


def param_shardings(model: nnx.Module, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """The `NamedSharding` of every parameter, from its logical axes."""
    state = nnx.state(model)
    return jax.tree.map(lambda v: named_sharding(v.shape, v.logical_axes, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def load_model(model: str, dtype: str = "auto", mesh: Mesh | None = None,
               rules: ShardingRules = ShardingRules(), attention_backend: str = "auto",
               load_format: str = "auto", seed: int = 0,
               attention_block_sizes: dict[str, int] | None = None, quantization: str | None = None) -> LoadedModel:
    """Load a Hugging Face directory, a GGUF file or a known model name onto `mesh` (one device by default).
    `load_format="dummy"` reads only the config and makes random weights on the devices; `quantization="fp8"`
    then turns the decoder projections into FP8 weights (`jaxllm.models.quantization`). With the Mosaic GPU
    attention kernels the decoder norms' scales are folded into the projections that read them."""
    check_method(quantization)
    source = resolve_source(model)
    hf_config = load_hf_config(source)
    cfg = ModelConfig.from_hf(hf_config, dtype)
    mesh = mesh or make_mesh()
    stages = mesh.shape["pipeline"]
    if load_format == "dummy":
        built = random_model(cfg, mesh, rules, seed, attention_backend, attention_block_sizes)
    elif source.kind == "jaxllm":
        Manifest.read(source.path)  # refuses a directory written in another format version
        built = _restore(abstract_model(cfg, attention_backend, stages, attention_block_sizes),
                         source.path / PARAMS_DIR, mesh, rules)
    else:
        built = _fill(abstract_model(cfg, attention_backend, stages, attention_block_sizes),
                      open_reader(source, cfg), mesh, rules, cfg)
    if built.attention_backend == "pallas_gpu":
        built.layers.fold_norm_scales()  # measured on the Mosaic GPU path only (`DecoderLayer.fold_norm_scales`)
    if quantization:
        quantize_model(built, quantization, mesh, rules)
    logger.info("loaded %s (%s%s, %s) from %s", cfg.architecture, cfg.dtype,
                f", {quantization} projections" if quantization else "", _count(built), source.path)
    return LoadedModel(built, cfg, mesh, hf_config, source)


def random_model(cfg: ModelConfig, mesh: Mesh | None = None, rules: ShardingRules = ShardingRules(),
                 seed: int = 0, attention_backend: str = "auto",
                 attention_block_sizes: dict[str, int] | None = None) -> nnx.Module:
    """A model with random weights created directly in their shardings on the devices (for benchmarks)."""
    mesh = mesh or make_mesh()
    stages = mesh.shape["pipeline"]
    abstract = abstract_model(cfg, attention_backend, stages, attention_block_sizes)
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh, rules)

    @jax.jit
    def init():
        state = nnx.state(model_class(cfg)(cfg, nnx.Rngs(seed), attention_backend=attention_backend,
                                           pipeline_stages=stages, attention_block_sizes=attention_block_sizes))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())


def open_reader(source: ModelSource, cfg: ModelConfig) -> TensorReader:
    """A reader of the source's tensors by Hugging Face name (converted directories are restored instead)."""
    if source.kind == "jaxllm":
        raise ValueError(f"{source.path} is already a converted jaxllm model directory")
    if source.kind == "gguf":
        return GGUFReader(source.path, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    return SafetensorsReader(source.path)


def read_tensor(reader: TensorReader, rule: TensorRule, cfg: ModelConfig, shape: tuple[int, ...]) -> np.ndarray:
    """One parameter in jaxllm layout, each checkpoint tensor checked against `shape` (per-layer ones stacked,
    then zero-padded to `shape[0]` layers: the identity layers that even out pipeline stages)."""
    layers = range(cfg.num_layers) if rule.per_layer else [None]
    part_shape = shape[1:] if rule.per_layer else shape
    parts = [_read_part(reader, rule, cfg, [name.format(i=i) for name in rule.hf_names], part_shape)
             for i in layers]
    if not rule.per_layer:
        return parts[0]
    return np.pad(np.stack(parts), [(0, shape[0] - len(parts))] + [(0, 0)] * len(part_shape))


def _read_part(reader: TensorReader, rule: TensorRule, cfg: ModelConfig, names: list[str],
               part_shape: tuple[int, ...]) -> np.ndarray:
    """One layer's (or a global) value of a parameter: each named tensor transformed and checked, and several
    stacked on, or joined along, the rule's axis."""
    tensors = []
    for name, each_shape in zip(names, _part_shapes(rule, cfg, part_shape)):
        try:
            raw = reader.get(name)
        except KeyError:
            raise CheckpointError(f"checkpoint has no tensor {name!r} (needed for {'.'.join(rule.path)})") from None
        try:
            tensor = rule.transform(raw, cfg)
        except ValueError:
            tensor = None
        if tensor is None or tensor.shape != each_shape:
            per_layer = " per layer" if rule.per_layer else ""
            raise CheckpointError(f"tensor {name!r} has shape {raw.shape}, which does not fit the config "
                                  f"({'.'.join(rule.path)} needs {each_shape}{per_layer} from it)")
        tensors.append(tensor)
    if rule.stack_axis is not None:
        return np.stack(tensors, axis=rule.stack_axis)
    return tensors[0] if rule.join_axis is None else np.concatenate(tensors, axis=rule.join_axis)


def _part_shapes(rule: TensorRule, cfg: ModelConfig, part_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape each of the rule's tensors must have once transformed."""
    if rule.stack_axis is not None:
        return [part_shape[:rule.stack_axis] + part_shape[rule.stack_axis + 1:]] * len(rule.hf_names)
    if rule.join_axis is not None:
        axis = rule.join_axis
        return [part_shape[:axis] + (size,) + part_shape[axis + 1:] for size in rule.join_sizes(cfg)]
    return [part_shape]


def checked_tensors(abstract: nnx.Module, reader: TensorReader, cfg: ModelConfig
                    ) -> Iterator[tuple[tuple[str, ...], nnx.Variable, np.ndarray]]:
    """Every parameter's checkpoint value, read and checked against the model's shape (with a progress bar)."""
    variables = dict(nnx.to_flat_state(nnx.state(abstract)))
    for rule in tqdm(tensor_rules(cfg), desc="reading weights", unit="tensor", leave=False):
        var = variables.pop(rule.path)
        yield rule.path, var, read_tensor(reader, rule, cfg, var.shape)
    if variables:
        raise CheckpointError(f"no checkpoint rule for parameters {sorted('.'.join(p) for p in variables)}")


def _fill(abstract: nnx.Module, reader: TensorReader, mesh: Mesh, rules: ShardingRules,
          cfg: ModelConfig) -> nnx.Module:
    """Read every parameter and place it in its sharding."""
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    for path, var, array in checked_tensors(abstract, reader, cfg):
        sharding = named_sharding(var.shape, var.logical_axes, mesh, rules)
        variables[path].set_value(jax.device_put(array.astype(var.dtype), sharding))
    return nnx.merge(graphdef, state)


def _restore(abstract: nnx.Module, params_dir: Path, mesh: Mesh, rules: ShardingRules) -> nnx.Module:
    """Restore a converted model's parameters straight into their shardings: each device reads its shards.
    Layer stacks longer than saved (pipeline stages' identity layers) are zero-padded by the restore."""
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    target = nest({path: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=named_sharding(
        v.shape, v.logical_axes, mesh, rules)) for path, v in flat})
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target, strict=not _padded(abstract))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore the parameters ({e})") from e
    for path, var in flat:
        var.set_value(functools.reduce(lambda tree, key: tree[key], path, restored))
    return nnx.merge(graphdef, state)


def _padded(model: nnx.Module) -> bool:
    return getattr(model, "pipeline_stages", 1) > 1 and model.cfg.num_layers % model.pipeline_stages != 0


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """`{("layers", "attn", "qkv_proj"): x}` -> `{"layers": {"attn": {"qkv_proj": x}}}` (the saved tree's shape)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _count(model: nnx.Module) -> str:
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    return f"{n / 1e6:.1f}M parameters"
