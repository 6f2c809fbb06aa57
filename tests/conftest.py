"""Test set-up: JAX on the CPU with 8 virtual devices, so tensor parallelism runs anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_llm(tmp_path_factory):
    """One engine on the default model for all engine tests (start-up costs seconds on a CPU)."""
    from jaxllm import LLM

    return LLM(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128,
               compilation_cache_dir=str(tmp_path_factory.mktemp("xla")))
