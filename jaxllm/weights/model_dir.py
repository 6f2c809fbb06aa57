"""The converted model directory: what `jaxllm convert` writes and `load_model` restores.

    OUT/config.json, generation_config.json, tokenizer files   (Hugging Face format)
    OUT/jaxllm.json                                            (format version, architecture, dtype, source)
    OUT/params/                                                (orbax checkpoint: jaxllm's parameter tree)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

FORMAT_VERSION = 3  # 2: k/v and gate/up stacked into one parameter each; 3: q, k and v one parameter
MANIFEST = "jaxllm.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What `jaxllm.json` records about a converted model."""

    architecture: str
    dtype: str
    source: str
    source_sha256: str
    num_parameters: int
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        data = json.loads((directory / MANIFEST).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: jaxllm format version {data.get('format_version')} is not "
                             f"{FORMAT_VERSION}; convert the model again")
        return cls(**data)


def is_converted(directory: Path) -> bool:
    return (directory / MANIFEST).is_file() and (directory / PARAMS_DIR).is_dir()
