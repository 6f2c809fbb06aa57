"""JAX's persistent compilation cache, on by default so that a restart reuses compiled step buckets."""

from __future__ import annotations

import logging
from pathlib import Path

import jax

logger = logging.getLogger(__name__)


def enable_compilation_cache(directory: Path) -> None:
    """Cache every compiled program (however quick to compile) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("persistent compilation cache: %s", directory)
