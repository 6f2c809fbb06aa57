"""Keeping compiled programs across restarts: JAX's persistent compilation cache, on by default, and the step
cache, which stores each compiled step variant under a key of everything that shapes it.

JAX's cache finds an entry by the lowered program, so a restart still traces and lowers every step variant
(about 1 s each for an 8B model, most of it lowering the Mosaic GPU attention kernel). The step cache keys
a variant by what determines that program instead (jaxllm's own source, the JAX version, the devices, the
XLA options, the model and engine settings, the argument shapes and shardings) and loads it without tracing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
from jax._src import dispatch
from jax.experimental import serialize_executable

logger = logging.getLogger(__name__)

# Engine settings that do not change a compiled step (where the weights come from, seeds, how the KV cache
# size is chosen: the cache's shape is part of the arguments' signature; when steps are dispatched).
_UNCOMPILED_SETTINGS = frozenset({
    "model", "tokenizer", "seed", "skip_tokenizer_init", "generation_config", "compilation_cache_dir",
    "load_format", "gpu_memory_utilization", "num_gpu_blocks_override", "distributed_coordinator",
    "distributed_heartbeat_timeout", "async_scheduling"})
_PACKAGES = ("jaxllm", "pallas_kernels")


def enable_compilation_cache(directory: Path) -> None:
    """Cache every compiled program (however quick to compile) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("persistent compilation cache: %s", directory)


@functools.cache
def source_digest() -> str:
    """A digest of every Python file of jaxllm and its kernels: any code change makes new keys."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        root = Path(__import__(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def environment_parts(mesh: jax.sharding.Mesh) -> tuple:
    """What outside jaxllm's code changes a compiled program: versions, devices and compiler options."""
    devices = tuple((d.platform, d.device_kind, d.id, d.process_index) for d in mesh.devices.flat)
    return (jax.__version__, jax.lib.__version__, devices, dict(mesh.shape), jax.process_count(),
            jax.devices()[0].client.platform_version, os.environ.get("XLA_FLAGS", ""),
            os.environ.get("LIBTPU_INIT_ARGS", ""), jax.config.jax_enable_x64,
            jax.config.jax_default_matmul_precision)


def settings_parts(engine_config: Any) -> dict:
    """The engine settings that shape a compiled step."""
    return {k: v for k, v in dataclasses.asdict(engine_config).items() if k not in _UNCOMPILED_SETTINGS}


def signature(args: tuple) -> str:
    """The structure, shapes, dtypes and shardings of a call's arguments."""
    leaves, tree = jax.tree.flatten(args)
    return repr((tree, [(x.shape, str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves]))


@dataclasses.dataclass
class StepCache:
    """Compiled step variants on disk, one file per key."""

    directory: Path
    devices: tuple[jax.Device, ...]  # the steps' devices, in the mesh's order (their executables' assignment)
    context: str  # every key's common part: source digest, environment, model and engine settings
    loaded: int = 0
    compiled: int = 0

    @classmethod
    def create(cls, directory: Path, mesh: jax.sharding.Mesh, *parts: Any) -> "StepCache":
        """A cache for the steps of `mesh`; `parts` are whatever else shapes them (settings, model config)."""
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, tuple(mesh.devices.flat), repr((source_digest(), environment_parts(mesh), *parts)))

    def get(self, name: Any, args: tuple, compile_fn: Callable[[], jax.stages.Compiled]) -> jax.stages.Compiled:
        """The compiled variant `name` for `args`: loaded when this exact program was stored, else compiled
        by `compile_fn` and stored."""
        key = hashlib.sha256(repr((self.context, name, signature(args))).encode()).hexdigest()
        path = self.directory / f"{key}.step"
        if path.exists():
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                executable = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                       execution_devices=self.devices)
                self.loaded += 1
                return executable
            except Exception as e:  # a truncated or foreign file: compile afresh and replace it
                logger.warning("step cache entry %s is unusable (%s: %s); compiling it again", path,
                               type(e).__name__, e)
        with _compile_events() as events:
            executable = compile_fn()
        self.compiled += 1
        if events == ["compiled"] or self.devices[0].platform != "cpu":
            self._store(path, executable)
        else:
            # XLA:CPU drops the compiled functions of an executable that JAX loaded from its cache when it is
            # serialized again (jax 0.11.2: the copy fails with "Function ... not found"): store fresh compiles only.
            logger.info("step variant %s came from JAX's compilation cache; not stored in the step cache", name)
        return executable

    @staticmethod
    def _store(path: Path, executable: jax.stages.Compiled) -> None:
        """Write the entry atomically (a reader never sees half a file); a backend that cannot serialize its
        executables just leaves the cache empty."""
        try:
            data = pickle.dumps(serialize_executable.serialize(executable))
        except Exception as e:
            logger.warning("cannot store compiled step in %s (%s: %s)", path.parent, type(e).__name__, e)
            return
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(path)


@contextlib.contextmanager
def _compile_events() -> Iterator[list[str]]:
    """What JAX did to get the programs compiled inside the block: XLA compilations and cache hits."""
    events: list[str] = []

    def on_event(event: str, **kwargs: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            events.append("cache hit")

    def on_duration(event: str, duration: float, **kwargs: Any) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            events.append("compiled")

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_duration)
