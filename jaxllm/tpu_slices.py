"""Cloud TPU slice configs (`tpu_configs/*.yaml`): their `tpu:` section, and what fits on each slice.

A slice config is a `jaxllm serve --config` file: engine settings under vLLM's names (and jaxllm's
`attention_block_sizes`), plus a `tpu:` section the engine does not apply (the accelerator type, the
chips' HBM, the models the config suits). `plan()` is the memory arithmetic of docs/tpu.md: per chip, a
model's weights and KV cache as the engine's own sharding rules split them, within
`gpu_memory_utilization` of the chip's HBM.
`python -m jaxllm.tpu_slices tpu_configs/*.yaml` prints the tables of docs/tpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import yaml
from jax.sharding import AbstractMesh

from jaxllm.config import ModelConfig, RopeConfig
from jaxllm.parallel import KV_CACHE_AXES, MESH_AXES, ShardingRules, partition_spec

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's chip, as Cloud TPU's documentation gives it."""

    hbm_gib: int
    hbm_gb_per_s: int
    bf16_tflops: int
    tensorcores: int  # the accelerator type counts TensorCores: two per chip on v5p


CHIPS = {"v5e": Chip(16, 819, 197, 1), "v6e": Chip(32, 1640, 918, 1), "v5p": Chip(95, 2765, 459, 2)}


def parse_accelerator_type(name: str) -> tuple[str, int]:
    """`v6e-8` -> (`v6e`, 8 chips); `v5p-8` -> (`v5p`, 4 chips)."""
    generation, _, count = name.partition("-")
    if generation not in CHIPS or not count.isdigit() or int(count) % CHIPS[generation].tensorcores:
        raise ValueError(f"tpu.accelerator_type {name!r}: expected GENERATION-COUNT with a generation in "
                         f"{', '.join(CHIPS)}")
    return generation, int(count) // CHIPS[generation].tensorcores


@dataclasses.dataclass(frozen=True)
class TpuSection:
    """The `tpu:` section of a slice config: what the slice is and what the config was sized for."""

    accelerator_type: str
    chips: int
    hbm_gib_per_chip: int
    models: tuple[str, ...]

    @property
    def generation(self) -> str:
        return parse_accelerator_type(self.accelerator_type)[0]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @classmethod
    def from_yaml(cls, section: Any) -> "TpuSection":
        """Check a parsed `tpu:` mapping; a ValueError names the offending key."""
        if not isinstance(section, dict):
            raise ValueError("tpu: expected a mapping")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in names:
                raise ValueError(f"tpu.{key}: unknown key (known: {', '.join(names)})")
        for key in names:
            if key not in section:
                raise ValueError(f"tpu.{key}: missing")
        tpu = cls(**{**section, "models": tuple(section["models"] or ())})
        tpu._check()
        return tpu

    def _check(self) -> None:
        generation, chips = parse_accelerator_type(self.accelerator_type)
        if self.chips != chips:
            raise ValueError(f"tpu.chips: {self.accelerator_type} has {chips} chips, not {self.chips!r}")
        if self.hbm_gib_per_chip != CHIPS[generation].hbm_gib:
            raise ValueError(f"tpu.hbm_gib_per_chip: a {generation} chip has {CHIPS[generation].hbm_gib} GiB, "
                             f"not {self.hbm_gib_per_chip!r}")
        if not all(isinstance(model, str) for model in self.models):
            raise ValueError("tpu.models: expected a list of model names")


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """A parsed slice config file: the engine settings (underscored names) and its `tpu:` section."""

    name: str
    engine: dict[str, Any]
    tpu: TpuSection


def load(path: str | Path) -> SliceConfig:
    """Read a slice config file (as `jaxllm serve --config` reads it, plus its `tpu:` section)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict) or "tpu" not in raw:
        raise ValueError(f"{path}: a slice config is a mapping with a 'tpu:' section")
    engine = {key.replace("-", "_"): value for key, value in raw.items() if key != "tpu"}
    return SliceConfig(Path(path).stem, engine, TpuSection.from_yaml(raw["tpu"]))


def _decoder(arch: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
             max_len: int, head_dim: int = 128, tied: bool = False) -> ModelConfig:
    """The shapes of a published checkpoint (rope and norm details left at defaults: memory only)."""
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-5, rope=RopeConfig(), max_position_embeddings=max_len,
                       tie_word_embeddings=tied, qkv_bias=arch == "Qwen2ForCausalLM", dtype="bfloat16")


_LLAMA, _QWEN2 = "LlamaForCausalLM", "Qwen2ForCausalLM"
# Shapes from each checkpoint's config.json; the names are what `tpu.models` lists.
MODELS = {
    "meta-llama/Llama-3.2-1B-Instruct": _decoder(_LLAMA, 128256, 2048, 8192, 16, 32, 8, 131072, 64, tied=True),
    "meta-llama/Llama-3.2-3B-Instruct": _decoder(_LLAMA, 128256, 3072, 8192, 28, 24, 8, 131072, tied=True),
    "meta-llama/Llama-3.1-8B-Instruct": _decoder(_LLAMA, 128256, 4096, 14336, 32, 32, 8, 131072),
    "meta-llama/Llama-3.1-70B-Instruct": _decoder(_LLAMA, 128256, 8192, 28672, 80, 64, 8, 131072),
    "Qwen/Qwen2.5-7B-Instruct": _decoder(_QWEN2, 152064, 3584, 18944, 28, 28, 4, 32768),
    "Qwen/Qwen2.5-32B-Instruct": _decoder(_QWEN2, 152064, 5120, 27648, 64, 40, 8, 32768),
    "Qwen/Qwen2.5-72B-Instruct": _decoder(_QWEN2, 152064, 8192, 29568, 80, 64, 8, 32768),
}
TABLE_MODELS = ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct")  # docs/tpu.md's


def abstract_mesh(tensor: int, pipeline: int = 1) -> AbstractMesh:
    """The engine's `data x pipeline x tensor` mesh, shape only (no devices needed)."""
    return AbstractMesh((1, pipeline, tensor), MESH_AXES)


def per_chip_elements(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: AbstractMesh) -> int:
    """Elements of one chip's shard, split as `jaxllm.parallel`'s rules split the array."""
    spec = partition_spec(shape, logical_axes, mesh, ShardingRules())
    return math.prod(size // (mesh.shape[axis] if axis else 1) for size, axis in zip(shape, spec))


def weight_bytes(model: ModelConfig, mesh: AbstractMesh) -> int:
    """One chip's share of the parameters, from the model's own parameter list and logical axes."""
    from flax import nnx

    from jaxllm.model_loader import abstract_model

    variables = jax.tree.leaves(nnx.state(abstract_model(model, attention_backend="reference")),
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sum(per_chip_elements(v.shape, v.logical_axes, mesh) * np.dtype(v.dtype).itemsize for v in variables)


def kv_bytes_per_token(model: ModelConfig, mesh: AbstractMesh) -> int:
    """One chip's KV-cache bytes per token: K and V of every layer, split by whole KV heads."""
    per_head = (model.num_layers, 1, 1, model.num_kv_heads, model.head_dim)
    return 2 * per_chip_elements(per_head, KV_CACHE_AXES, mesh) * np.dtype(model.jnp_dtype).itemsize


def workspace_bytes(model: ModelConfig, tensor: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """An estimate of what a step of the largest bucket needs besides weights and cache, with the engine's margin
    (x1.2 + 512 MiB): three float32 copies of one layer's activations per token and four of every sequence's
    logits. For Llama-3.1-8B on one chip at 2048 tokens and 256 sequences it gives 1.99 GiB before the margin,
    where XLA counted 1.71 GiB on an H200 (docs/performance.md); the engine measures the real figure at start-up."""
    width = (4 * model.hidden_size + 3 * model.intermediate_size // tensor
             + (model.num_heads + 2 * model.num_kv_heads) * model.head_dim // tensor)
    temporaries = 3 * max_num_batched_tokens * width * 4 + 4 * max_num_seqs * model.vocab_size * 4
    return int(temporaries * 1.2) + 512 * MIB


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """One model on one slice config, per chip: bytes, and the KV tokens that fit in whole pages."""

    budget: int  # HBM x gpu_memory_utilization
    weights: int
    workspace: int
    kv_per_token: int
    block_size: int
    max_model_len: int

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache that fit beside the weights and the workspace (0 when the weights do not fit)."""
        pages = (self.budget - self.weights - self.workspace) // (self.kv_per_token * self.block_size)
        return max(pages, 0) * self.block_size

    def sequences(self, context: int) -> int:
        """How many sequences of `context` tokens the KV cache holds at once."""
        return self.kv_tokens // (-(-context // self.block_size) * self.block_size)

    @property
    def fits(self) -> bool:
        """The weights and the KV cache of at least one `max_model_len` sequence fit."""
        return self.sequences(self.max_model_len) >= 1


def plan(model: ModelConfig, config: SliceConfig) -> MemoryPlan:
    """The memory arithmetic of `model` served with `config` on its slice."""
    engine = config.engine
    tensor, pipeline = engine["tensor_parallel_size"], engine.get("pipeline_parallel_size", 1)
    mesh = abstract_mesh(tensor, pipeline)
    return MemoryPlan(
        budget=int(config.tpu.hbm_gib_per_chip * GIB * engine["gpu_memory_utilization"]),
        weights=weight_bytes(model, mesh),
        workspace=workspace_bytes(model, tensor, engine["max_num_batched_tokens"], engine["max_num_seqs"]),
        kv_per_token=kv_bytes_per_token(model, mesh),
        block_size=engine["block_size"],
        max_model_len=min(engine["max_model_len"], model.max_position_embeddings),
    )


def markdown_table(configs: Sequence[SliceConfig], model_name: str,
                   contexts: Sequence[int] = (8192, 32768, 131072)) -> str:
    """docs/tpu.md's table for one model: a row per slice config."""
    header = ["config", "chips x tensor", "budget/chip", "weights/chip", "workspace/chip (est.)",
              "KV/token/chip", "KV tokens"] + [f"sequences of {c // 1024}k" for c in contexts]
    rows = [header, ["---"] * len(header)]
    for config in configs:
        p = plan(MODELS[model_name], config)
        head = [config.name, f"{config.tpu.chips} x {config.engine['tensor_parallel_size']}", _gib(p.budget),
                _gib(p.weights)]
        if p.kv_tokens == 0:
            why = "weights alone exceed the budget" if p.weights > p.budget else "no room left for the KV cache"
            rows.append(head + [f"does not fit: {why}"] + [""] * (len(header) - len(head) - 1))
            continue
        rows.append(head + [_gib(p.workspace), f"{p.kv_per_token // 1024} KiB", f"{p.kv_tokens:,}"]
                    + [f"{p.sequences(c):,}" for c in contexts])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def slice_order(config: SliceConfig) -> tuple[int, int]:
    """v5e, v6e, v5p (the order of `CHIPS`), then by chip count."""
    return list(CHIPS).index(config.tpu.generation), config.tpu.chips


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print docs/tpu.md's memory tables for slice configs")
    parser.add_argument("configs", nargs="+", type=Path)
    configs = sorted((load(path) for path in parser.parse_args(argv).configs), key=slice_order)
    for name in TABLE_MODELS:
        print(f"### {name.split('/')[-1]}\n\n{markdown_table(configs, name)}\n")


if __name__ == "__main__":
    main()
