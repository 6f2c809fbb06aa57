"""XLA options jaxllm sets before JAX starts its backends (JAX reads `XLA_FLAGS` once, at backend start).

GEMMs go to cuBLAS rather than XLA's Triton GEMM fusions on GPUs. The decoder layers run as a scan over
stacked weights, and a Triton GEMM cannot read a layer's slice in place: XLA copied every layer's weights
before its GEMMs, which doubled batch-1 decode on an H100 (17.5 against 8.8 ms per token at Llama-3.1-8B
shape, `benchmarks/decode_xla_flags.py`). cuBLAS calls take the slice where it lies.

XLA's dot merger is off: it merged the q, k and v projections into one GEMM by concatenating their weights,
which in the layer scan is a fresh 48 MiB copy per layer (about 1 ms per token at 8B shape on an H100).

A flag the user already put in `XLA_FLAGS` wins over ours (so `--xla_disable_hlo_passes=...` of the user's
own replaces ours). The Triton option only concerns GPUs; the dot merger is off for every XLA compiler that
reads `XLA_FLAGS` (the CPU tests run that way; it was measured only on the H100), since the same weight copy
would appear wherever the merger runs inside the layer scan.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_disable_hlo_passes=dot-merger")


def _name(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0]


def merged(user_flags: str) -> str:
    """`user_flags` plus each default whose option the user did not set."""
    set_by_user = {_name(f) for f in user_flags.split()}
    extra = [f for f in DEFAULT_FLAGS if _name(f) not in set_by_user]
    return " ".join([user_flags.strip(), *extra]).strip()


def apply_defaults() -> None:
    """Put the defaults into `XLA_FLAGS` if JAX has not started a backend yet; otherwise say that they
    could not be applied, where it matters (a GPU backend)."""
    from jax._src import xla_bridge

    current = os.environ.get("XLA_FLAGS", "")
    wanted = merged(current)
    if wanted == current.strip():
        return
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = wanted
        return
    import jax

    if jax.default_backend() == "gpu":
        logger.warning("JAX started before jaxllm was imported, so XLA_FLAGS lacks %s: layer weights are "
                       "copied before each GEMM and decode runs about twice as slow; import jaxllm first "
                       "or set XLA_FLAGS='%s'", " ".join(DEFAULT_FLAGS), wanted)
