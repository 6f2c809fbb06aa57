"""`EngineConfig`: every knob of the engine under vLLM's names, with defaults resolved per platform."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm import distributed
from jaxllm.models.quantization import check_method

# vLLM's defaults where they suit; on CPU, smaller batches so that start-up compiles stay quick.
# num_scheduler_steps: 8 decode steps per host round trip on accelerators (vLLM's usual multi-step setting)
# cuts the host's share of a decode token 8x at the cost of up to 7 wasted tokens per stop and new requests
# waiting up to 8 steps to join; on CPU the device is the bottleneck, so 1 keeps tests simple.
_ACCELERATOR_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "num_scheduler_steps": 8}
_CPU_DEFAULTS = {"max_num_seqs": 16, "max_num_batched_tokens": 256, "num_scheduler_steps": 1}
CPU_KV_CACHE_BYTES = 1 << 30  # the KV cache on CPU when num_gpu_blocks_override is not given
MIN_TOKEN_BUCKET = 16
# vLLM's --kv-cache-dtype values: "auto" stores K/V in the model's dtype; the 8-bit floats hold them saturated to
# the format's range (a scale of 1, vLLM's default when a checkpoint carries no k/v scales), stored as bytes.
KV_CACHE_DTYPES = {"auto": None, "bfloat16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "fp8_e5m2": jnp.float8_e5m2}


@dataclasses.dataclass
class EngineConfig:
    """What `LLM(...)` and `jaxllm serve` accept (vLLM's names)."""

    model: str = "SmolLM2-135M-Instruct"
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: "fp8" halves the cache's bytes (twice the pages)
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    skip_tokenizer_init: bool = False
    num_gpu_blocks_override: int | None = None
    max_logprobs: int = 20
    attention_backend: str = "auto"
    # Pallas kernel block sizes, e.g. {"block_q": 64, "block_kv_tokens": 512} (pallas_tpu) or {"block_kv": 64,
    # "num_stages": 3} (pallas_gpu); None: the kernel's own choice for the chip. jaxllm's own setting.
    attention_block_sizes: dict[str, int] | None = None
    generation_config: str = "auto"
    compilation_cache_dir: str | None = None
    load_format: str = "auto"  # "dummy": random weights made on the devices (benchmarks), as in vLLM
    quantization: str | None = None  # "fp8": 8-bit projection weights made at load time, as in vLLM
    num_scheduler_steps: int | None = None  # decode steps per engine step for decode-only batches (vLLM's)
    # Dispatch step N+1 before step N's tokens reach the host (vLLM's --async-scheduling; DESIGN rule 5).
    async_scheduling: bool = True
    # Multi-host (jaxllm.distributed): all three to join a job, none to be one process (or auto on a TPU slice).
    distributed_coordinator: str | None = None  # host:port of process 0, the same on every process
    num_processes: int | None = None
    process_id: int | None = None  # 0 runs the scheduler and server; the others follow its steps
    distributed_heartbeat_timeout: int = 100  # seconds before JAX counts a silent process as dead

    def __post_init__(self) -> None:
        # jax.distributed must start before JAX's backend, which the defaults below start.
        distributed.initialize(distributed.DistributedSettings(
            self.distributed_coordinator, self.num_processes, self.process_id, self.distributed_heartbeat_timeout))
        # JAX reserves XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of each GPU when its backend starts:
        # make that our budget, unless the user chose a fraction or JAX has started already.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{self.gpu_memory_utilization:.4f}")
        defaults = _CPU_DEFAULTS if jax.default_backend() == "cpu" else _ACCELERATOR_DEFAULTS
        if self.max_num_seqs is None:
            self.max_num_seqs = defaults["max_num_seqs"]
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = defaults["max_num_batched_tokens"]
        if self.num_scheduler_steps is None:
            self.num_scheduler_steps = defaults["num_scheduler_steps"]
        self._validate()

    def _validate(self) -> None:
        checks = [
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be at least 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be at least 1"),
            (self.block_size >= 1, "block_size", "must be at least 1"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be at least 1"),
            (self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be at least 1"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be at least 1"),
            (self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1, "num_gpu_blocks_override",
             "must be at least 1"),
            (self.max_logprobs >= 0, "max_logprobs", "must be non-negative"),
            (self.num_scheduler_steps >= 1, "num_scheduler_steps", "must be at least 1"),
            (self.load_format in ("auto", "dummy"), "load_format", "must be 'auto' or 'dummy'"),
            (self.attention_block_sizes is None or isinstance(self.attention_block_sizes, dict) and all(
                isinstance(v, int) and v >= 1 for v in self.attention_block_sizes.values()),
             "attention_block_sizes", "must map kernel block-size names to positive integers"),
            (self.distributed_heartbeat_timeout >= 1, "distributed_heartbeat_timeout", "must be at least 1"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{name} {message}, got {getattr(self, name)!r}")
        check_method(self.quantization)

    def memory_budget(self, device: jax.Device, bytes_limit: int) -> float:
        """Bytes jaxllm may use on `device`: `gpu_memory_utilization` of the accelerator, within what JAX
        reserved (`bytes_limit`: on GPUs, XLA_PYTHON_CLIENT_MEM_FRACTION of the memory; on TPUs, all of it)."""
        if device.platform == "gpu":
            reserved = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
            return bytes_limit * min(1.0, self.gpu_memory_utilization / reserved)
        return bytes_limit * self.gpu_memory_utilization

    def resolved_dtype(self) -> str:
        """`auto` is the checkpoint's dtype on accelerators and float32 on CPU."""
        if self.dtype == "auto" and jax.default_backend() == "cpu":
            return "float32"
        return self.dtype

    def cache_dtype(self, model_dtype) -> jnp.dtype:
        """The type of the values the KV cache holds for a model computing in `model_dtype` (the runner stores
        8-bit floats as bytes)."""
        return jnp.dtype(KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype)

    def token_buckets(self) -> list[int]:
        """Padded token counts of a step: powers of two from 16 up to `max_num_batched_tokens`."""
        buckets, size = [], MIN_TOKEN_BUCKET
        while size < self.max_num_batched_tokens:
            buckets.append(size)
            size *= 2
        return buckets + [self.max_num_batched_tokens]

    def seq_bucket(self, token_bucket: int) -> int:
        """Padded number of sequences for a token bucket (a step never has more sequences than tokens)."""
        return min(token_bucket, self.max_num_seqs)

    def cache_dir(self) -> Path:
        """JAX's persistent compilation cache: `compilation_cache_dir`, `$JAXLLM_CACHE_DIR`, or ~/.cache."""
        if self.compilation_cache_dir:
            return Path(self.compilation_cache_dir)
        root = os.environ.get("JAXLLM_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxllm")
        return Path(root) / "xla"
