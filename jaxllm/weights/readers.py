"""Read checkpoint tensors by their Hugging Face names, as host numpy arrays in Hugging Face layout.

`SafetensorsReader` reads single or sharded (`model.safetensors.index.json`) checkpoints. `GGUFReader`
translates Hugging Face names into GGUF ones with the `gguf` package's own name map, dequantizes with its
dequantizer, and undoes llama.cpp's Q/K row permutation so that both readers return the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import gguf
import jax
import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or lacks a tensor the model needs."""


class TensorReader(Protocol):
    """Looks tensors up by Hugging Face name; raises KeyError for a tensor the checkpoint lacks."""

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsReader:
    """Tensors of a Hugging Face directory; the index (if any) says which file holds which tensor."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: directory / f for name, f in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory} has no *.safetensors files")
            self._file_of = {name: f for f in files for name in self._keys(f)}
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="flax") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e

    def get(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="flax")
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                return np.asarray(self._handles[path].get_tensor(name))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e


_GGUF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


class GGUFReader:
    """Dequantized tensors of a GGUF file, under their Hugging Face names."""

    def __init__(self, path: Path, num_layers: int, num_heads: int, num_kv_heads: int):
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
        self.path = path
        self.arch = self._reader.fields["general.architecture"].contents()
        if self.arch not in _GGUF_ARCHS:
            raise CheckpointError(f"{path}: GGUF architecture {self.arch!r} is not supported "
                                  f"({', '.join(_GGUF_ARCHS)})")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._name_map = gguf.get_tensor_name_map(_GGUF_ARCHS[self.arch], num_layers)
        self._heads = {"q_proj": num_heads, "k_proj": num_kv_heads}

    def gguf_name(self, name: str) -> str | None:
        return self._name_map.get_name(name, try_suffixes=(".weight", ".bias"))

    def get(self, name: str) -> np.ndarray:
        gguf_name = self.gguf_name(name)
        if gguf_name is None or gguf_name not in self._tensors:
            raise KeyError(name)
        tensor = self._tensors[gguf_name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {gguf_name!r} "
                                  f"({tensor.tensor_type.name}): {e}") from e
        proj = name.split(".")[-2]
        if self.arch == "llama" and proj in self._heads:
            array = unpermute_qk(array, self._heads[proj])
        return array


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary halves in Q/K rows (back to Hugging Face's half-split)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
