"""Check on a GPU that `pallas_kernels.l2_prefetch.prefetch_layer` compiles, passes its `after` through unchanged,
and stays in the compiled program (XLA keeps it); time a bfloat16 GEMM of few rows with and without the
prefetch of its weight a few small kernels before it.

    python benchmarks/l2_prefetch_check.py
"""
import time

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.l2_prefetch import prefetch_layer


def layer_loop(prefetch: bool, layers: int = 32):
    def step(x, w, small):
        def body(carry):
            i, x, small = carry
            if prefetch:
                x = prefetch_layer(w, i, x)
            for _ in range(6):  # small kernels while L2 fills (each a sort: XLA cannot fuse them)
                small = jnp.sort(small * 1.0001, axis=-1)
            x = x * small[0, :1].astype(x.dtype)
            y = jnp.dot(x, lax.dynamic_index_in_dim(w, i, keepdims=False))
            return i + 1, y[:, :x.shape[1]], small
        return lax.while_loop(lambda c: c[0] < layers, body, (jnp.int32(0), x, small))[1]
    return jax.jit(step)


def main() -> None:
    k = jax.random.key(0)
    w = (jax.random.normal(k, (32, 4096, 4096), jnp.float32) * 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(k, (1, 4096), jnp.bfloat16)
    small = jax.random.uniform(k, (8, 1024), jnp.float32)
    after = jax.random.normal(k, (1, 6144), jnp.bfloat16)
    out = jax.jit(lambda w, a: prefetch_layer(w, jnp.int32(3), a))(w, after)
    assert bool(jnp.array_equal(out, after)), "prefetch_layer changed its `after`"
    hlo = jax.jit(lambda w, a: prefetch_layer(w, jnp.int32(3), a)).lower(w, after).compile().as_text()
    print("custom calls in the compiled program:", hlo.count("custom_call_target"))
    for prefetch in (False, True, False, True):
        fn = layer_loop(prefetch)
        y = fn(x, w, small).block_until_ready()
        start = time.perf_counter()
        for _ in range(20):
            y = fn(x, w, small)
        y.block_until_ready()
        print(f"prefetch={prefetch}: {(time.perf_counter() - start) / 20 * 1e3:.3f} ms for 32 layers")


if __name__ == "__main__":
    main()
