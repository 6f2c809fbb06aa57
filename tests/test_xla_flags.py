"""The XLA options jaxllm sets before JAX starts: added when missing, never over the user's own."""

import os
import subprocess
import sys

from jaxllm.xla_flags import DEFAULT_FLAGS, merged


def test_defaults_added_to_other_user_flags():
    flags = merged("--xla_dump_to=/tmp/x").split()
    assert flags[0] == "--xla_dump_to=/tmp/x"
    assert "--xla_gpu_enable_triton_gemm=false" in flags


def test_user_setting_wins():
    flags = merged("--xla_gpu_enable_triton_gemm=true --xla_disable_hlo_passes=foo").split()
    assert flags == ["--xla_gpu_enable_triton_gemm=true", "--xla_disable_hlo_passes=foo"]
    assert merged(" ".join(DEFAULT_FLAGS)) == " ".join(DEFAULT_FLAGS)


def test_importing_jaxllm_sets_xla_flags_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "import os, jaxllm, jax; jax.numpy.ones(1); print(os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(DEFAULT_FLAGS)


def test_warns_when_jax_started_on_a_gpu_without_the_flags(monkeypatch):
    """Too late to set XLA_FLAGS (JAX already runs on a GPU): jaxllm says so and leaves the environment."""
    import logging

    import jax
    from jax._src import xla_bridge

    import jaxllm.xla_flags as xla_flags

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jaxllm.xla_flags")
    logger.addHandler(handler)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    try:
        xla_flags.apply_defaults()
    finally:
        logger.removeHandler(handler)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "--xla_gpu_enable_triton_gemm=false" in records[0].getMessage()
