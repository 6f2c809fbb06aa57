"""Prototype timings for a sort-free top-k / top-p filter: the sorting filter against bisection searches over
float32 keys, and the two-round top-k. `[rows, 128256]` float32 logits, ms per call (GPU time).

    python benchmarks/filter_search.py [--rows 64 256]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from attention import gpu_time
from jax import lax
from sampler_costs import sampling_inputs

from jaxllm.sampling import filter_logits, top_k_by_chunks


def keys(x):
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def bisect(measure, target, hi):
    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        above = measure(mid) >= target
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
    return lax.fori_loop(0, 32, step, (jnp.zeros_like(hi), hi))[1]


def search(measure, target, hi, ways: int, broadcast: bool):
    """The smallest key t with measure(t) < target, probing ways - 1 keys per pass over the data."""
    passes = -(-32 // (ways.bit_length() - 1))

    def step(_, bounds):
        lo, hi = bounds
        span = hi - lo
        j = jnp.arange(1, ways, dtype=jnp.uint32)
        probes = lo[:, None] + (span // ways)[:, None] * j + jnp.minimum(j, (span % ways)[:, None])
        above = measure(probes, broadcast) >= target[:, None]  # [rows, ways - 1], true then false
        n = jnp.sum(above, axis=1)
        padded = jnp.concatenate([lo[:, None], probes, hi[:, None]], axis=1)
        return (jnp.take_along_axis(padded, n[:, None], 1)[:, 0],
                jnp.take_along_axis(padded, n[:, None] + 1, 1)[:, 0])

    return lax.fori_loop(0, passes, step, (jnp.zeros_like(hi), hi))[1]


def top_p_search_ways(x, top_p, ways: int, broadcast: bool):
    m = x.max(axis=-1, keepdims=True)
    inv = 1.0 / jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)

    def mass(ts, broadcast):
        k, p = keys(x), jnp.exp(x - m) * inv
        if broadcast:
            return jnp.sum(jnp.where(k[:, None, :] > ts[:, :, None], p[:, None, :], 0.0), axis=-1)
        return jnp.stack([jnp.sum(jnp.where(k > ts[:, j:j + 1], p, 0.0), axis=-1) for j in range(ts.shape[1])], 1)

    hi = search(mass, top_p, keys(m[:, 0]), ways, broadcast)
    return jnp.where(keys(x) < hi[:, None], -jnp.inf, x)


def top_p_search(x, top_p):
    m = x.max(axis=-1, keepdims=True)
    inv = 1.0 / jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)

    def mass(t):
        return jnp.sum(jnp.where(keys(x) > t[:, None], jnp.exp(x - m) * inv, 0.0), axis=-1)

    hi = bisect(mass, top_p, keys(m[:, 0]))
    return jnp.where(keys(x) < hi[:, None], -jnp.inf, x)


def count_search(x, k):
    def count(t):
        return jnp.sum(keys(x) > t[:, None], axis=-1, dtype=jnp.int32)
    hi = bisect(count, k, keys(x.max(axis=-1)))
    return jnp.where(keys(x) < hi[:, None], -jnp.inf, x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    for rows in args.rows:
        x = jax.random.normal(jax.random.key(0), (rows, 128256), jnp.float32) * 3.0
        inp = sampling_inputs(rows, 0.9, False)
        cases = {
            "sort filter (top-p 0.9)": (jax.jit(filter_logits), (x, inp)),
            "top-p search": (jax.jit(top_p_search), (x, inp.top_p)),
            "count search (k=50)": (jax.jit(count_search), (x, jnp.full((rows,), 50, jnp.int32))),
            "top_k_by_chunks 64": (jax.jit(lambda a: top_k_by_chunks(a, 64)), (x,)),
            **{f"top-p search {w}-way {'broadcast' if b else 'sums'}": (
                jax.jit(lambda a, t, w=w, b=b: top_p_search_ways(a, t, w, b)), (x, inp.top_p))
               for w in (4, 8, 16) for b in (False, True)},
            "top_k_by_chunks 128": (jax.jit(lambda a: top_k_by_chunks(a, 128)), (x,)),
        }
        ref = jnp.isfinite(filter_logits(x, inp))
        got = jnp.isfinite(top_p_search(x, inp.top_p))
        print(f"rows {rows}: top-p search keeps the sort's tokens but {int((ref != got).sum())} "
              f"(kept {int(ref.sum())} of {ref.size}); 8-way: {int((ref != jnp.isfinite(top_p_search_ways(x, inp.top_p, 8, False))).sum())}")
        for name, (fn, fargs) in cases.items():
            print(f"  {name}: {gpu_time(fn, *fargs) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
