"""`jaxllm convert`: a Hugging Face directory, a GGUF file or a known model name -> a jaxllm model directory.

The output (see `jaxllm.weights.model_dir`) holds the Hugging Face config, generation config and tokenizer
(for GGUF, built from its metadata, chat template included), a `jaxllm.json` manifest and the parameters
in jaxllm's own layout as an orbax checkpoint, so that loading is a sharded restore with no re-layout.
Everything is written into a hidden sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxllm.config import ModelConfig
from jaxllm.model_loader import abstract_model, checked_tensors, nest, open_reader
from jaxllm.weights.model_dir import PARAMS_DIR, Manifest
from jaxllm.weights.sources import ModelSource, load_generation_config, load_hf_config, load_tokenizer, resolve_source

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a conversion will produce."""

    source: ModelSource
    config: ModelConfig
    num_parameters: int
    num_bytes: int

    def describe(self) -> str:
        return (f"source:       {self.source.path} ({self.source.kind})\n"
                f"architecture: {self.config.architecture}\n"
                f"layers:       {self.config.num_layers}, hidden {self.config.hidden_size}, "
                f"heads {self.config.num_heads}/{self.config.num_kv_heads}, vocab {self.config.vocab_size}\n"
                f"parameters:   {self.num_parameters:,}\n"
                f"dtype:        {self.config.dtype}\n"
                f"bytes:        {self.num_bytes:,} ({self.num_bytes / 2**30:.2f} GiB)")


def plan(src: str, dtype: str = "auto") -> Plan:
    """Read the source's config (not its weights) and say what the conversion will write."""
    source = resolve_source(src)
    cfg = ModelConfig.from_hf(load_hf_config(source), dtype)
    shapes = jax.tree.leaves(abstract_model(cfg))
    count = sum(int(np.prod(x.shape)) for x in shapes)
    return Plan(source, cfg, count, count * np.dtype(cfg.jnp_dtype).itemsize)


def convert(src: str, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> Plan:
    """Convert `src` into the model directory `out`; nothing appears at `out` unless it all succeeded."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    the_plan = plan(src, dtype)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        _write(the_plan, staging)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return the_plan


def _write(the_plan: Plan, staging: Path) -> None:
    source, cfg = the_plan.source, the_plan.config
    hf_config = load_hf_config(source)
    hf_config.architectures = [cfg.architecture]
    hf_config.dtype = cfg.dtype
    hf_config.save_pretrained(staging)
    load_generation_config(source, hf_config).save_pretrained(staging)
    if has_tokenizer(source):
        load_tokenizer(source).save_pretrained(staging)
    else:
        logger.warning("%s has no tokenizer files; the converted model will need --tokenizer or token ids",
                       source.path)
    abstract = abstract_model(cfg)
    params = {path: array.astype(var.dtype)
              for path, var, array in checked_tensors(abstract, open_reader(source, cfg), cfg)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / PARAMS_DIR, nest(params))
    checkpointer.wait_until_finished()
    Manifest(cfg.architecture, cfg.dtype, str(source.path), source_checksum(source),
             the_plan.num_parameters).write(staging)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(source: ModelSource) -> bool:
    """GGUF files carry their tokenizer; a directory has one if it has any tokenizer file."""
    return source.kind == "gguf" or any((source.path / name).exists() for name in _TOKENIZER_FILES)


def _replace(staging: Path, out: Path) -> None:
    """Move the finished directory into place; an old `out` is removed only after the new one is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def source_checksum(source: ModelSource) -> str:
    """SHA-256 over the weight files (the GGUF, or every safetensors file in name order)."""
    files = [source.path] if source.kind == "gguf" else sorted(source.path.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in tqdm(files, desc="checksum", unit="file", leave=False):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
