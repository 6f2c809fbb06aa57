"""Step time of the model forward under pipeline stages, against one device, on random Llama-3.1-8B weights.

Two step shapes: a prefill step (8 sequences x 256 new tokens) and a decode step (256 sequences x 1 token
over 256 tokens of context). For each layout (pipeline x tensor) and micro-batch count: the median wall time
of the jitted forward (hidden states of every row, logits of each sequence's last row), the cache donated.

    python benchmarks/pipeline_step.py [--layouts 1x1,2x1] [--microbatches 1,2,4] [--preset llama3-8b]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import pipeline
from jaxllm.bench.presets import random_weights_dir
from jaxllm.model_loader import load_model
from jaxllm.parallel import ShardingRules, kv_cache_sharding, make_mesh, padded_layers
from pallas_kernels import AttentionMetadata, kv_cache_shape

PAGE = 16
SHAPES = {"prefill": (8, 256, 0), "decode": (256, 1, 256)}  # sequences, new tokens each, context before


def batch(num_seqs: int, q_len: int, context: int) -> tuple:
    """Tokens, positions and metadata of `num_seqs` sequences with disjoint pages."""
    pages = -(-(context + q_len) // PAGE)
    cu = np.arange(num_seqs + 1, dtype=np.int32) * q_len
    md = AttentionMetadata(jnp.asarray(cu), jnp.full(num_seqs, context + q_len, jnp.int32),
                           jnp.arange(num_seqs * pages, dtype=jnp.int32).reshape(num_seqs, pages),
                           jnp.asarray([num_seqs], jnp.int32))
    positions = jnp.asarray(np.tile(np.arange(context, context + q_len), num_seqs), jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, num_seqs * q_len), jnp.int32)
    return tokens, positions, md, jnp.asarray(cu[1:] - 1), num_seqs * pages


def time_step(model: nnx.Module, mesh, shape: tuple, iterations: int) -> float:
    """Median seconds of one forward step of `shape` on `model`."""
    cfg = model.cfg
    tokens, positions, md, last_rows, num_pages = batch(*shape)
    cache_shape = kv_cache_shape(padded_layers(cfg.num_layers, mesh.shape["pipeline"]), num_pages, PAGE,
                                 cfg.num_kv_heads, cfg.head_dim)
    sharding = kv_cache_sharding(cache_shape, mesh, ShardingRules())
    cache = jax.jit(lambda: jnp.zeros(cache_shape, cfg.jnp_dtype), out_shardings=sharding)()
    graphdef, state = nnx.split(model)

    def forward(state, cache, tokens, positions, md, last_rows):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(tokens, positions, cache, md)
        return model.compute_logits(hidden[last_rows]), cache

    step = jax.jit(forward, donate_argnums=(1,), out_shardings=(None, sharding))
    times = []
    for _ in range(iterations + 2):
        start = time.perf_counter()
        logits, cache = step(state, cache, tokens, positions, md, last_rows)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--layouts", default="1x1,2x1", help="pipeline x tensor, comma-separated")
    parser.add_argument("--microbatches", default="1,2,4", help="micro-batch counts tried under pipelining")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    directory = random_weights_dir(args.preset)
    default_count = pipeline.num_microbatches
    for layout in args.layouts.split(","):
        stages, tensor = map(int, layout.split("x"))
        mesh = make_mesh(tensor_parallel_size=tensor, pipeline_parallel_size=stages)
        model = load_model(directory, dtype="bfloat16", mesh=mesh, load_format="dummy").model
        counts = [int(c) for c in args.microbatches.split(",")] if stages > 1 else [1]
        for count in counts:
            pipeline.num_microbatches = lambda num_tokens, num_stages, count=count: count
            for name, shape in SHAPES.items():
                seconds = time_step(model, mesh, shape, args.iterations)
                print(json.dumps({"preset": args.preset, "pipeline": stages, "tensor": tensor,
                                  "microbatches": count, "step": name, "tokens": shape[0] * shape[1],
                                  "ms": round(seconds * 1e3, 3), "device": jax.devices()[0].device_kind}),
                      flush=True)
        pipeline.num_microbatches = default_count
        del model


if __name__ == "__main__":
    main()
