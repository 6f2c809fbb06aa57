"""The top-k / top-p / min-p filter without sorting (`sampling.filter_logits`: searches over the rows'
values, `_SEARCH_WAYS` parts a pass) against the filter that sorted every row (kept here as the baseline),
on `[rows, 128256]` float32 logits: GPU ms per call, and how many tokens the two keep differently (float32
sums in another order can move a token that sits on the top-p boundary).

    python benchmarks/filter_search.py [--rows 64 256] [--ways 2 4 8] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from attention import gpu_time, save_rows
from sampler_costs import sampling_inputs

from jaxllm import sampling


def sorting_filter(scaled: jax.Array, inp: sampling.SamplingInputs) -> jax.Array:
    """The filter as it was until session 9: a sort of every row, a softmax and a cumulative sum."""
    probs = jax.nn.softmax(scaled, axis=-1)
    scaled = jnp.where(probs < inp.min_p[:, None] * probs.max(axis=-1, keepdims=True), -jnp.inf, scaled)
    ordered = -jnp.sort(-scaled, axis=-1)
    vocab = scaled.shape[-1]
    kth = jnp.take_along_axis(ordered, jnp.clip(inp.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    kth = jnp.where(inp.top_k[:, None] > 0, kth, -jnp.inf)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    sorted_probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = (before < inp.top_p[:, None]) | (inp.top_p[:, None] >= 1.0)
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((scaled < threshold) | (scaled < kth), -jnp.inf, scaled)


def searching_filter(ways: int, top_k: bool):
    """`sampling.filter_logits` traced with `ways` parts a pass (with top-k's search or without, as the
    engine's `SamplerKind.FILTER` and `TOP_P`)."""
    def run(scaled, inp):
        saved, sampling._SEARCH_WAYS = sampling._SEARCH_WAYS, ways
        try:
            return sampling.filter_logits(scaled, inp, top_k=top_k)
        finally:
            sampling._SEARCH_WAYS = saved
    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--ways", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--output-json")
    args = parser.parse_args()
    out = []
    for rows in args.rows:
        logits = jax.random.normal(jax.random.key(0), (rows, 128256), jnp.float32) * 3.0
        for name, top_k, top_p in (("top-p 0.9", 0, 0.9), ("top-k 20, top-p 0.8", 20, 0.8)):
            inp = dataclasses.replace(sampling_inputs(rows, top_p, False), top_k=jnp.full((rows,), top_k, jnp.int32))
            sort_ms = gpu_time(jax.jit(sorting_filter), logits, inp) * 1e3
            sorted_kept = jnp.isfinite(sorting_filter(logits, inp))
            out.append(dict(rows=rows, case=name, filter="sort", ms=sort_ms, kept=int(sorted_kept.sum())))
            print(f"rows {rows}, {name}: sort {sort_ms:.3f} ms, keeps {int(sorted_kept.sum())} tokens")
            for ways in args.ways:
                search = searching_filter(ways, top_k > 0)
                ms = gpu_time(search, logits, inp) * 1e3
                differ = int((jnp.isfinite(search(logits, inp)) != sorted_kept).sum())
                out.append(dict(rows=rows, case=name, filter=f"search {ways} ways", ms=ms, differ=differ))
                print(f"  search, {ways} ways: {ms:.3f} ms ({sort_ms / ms:.2f}x), tokens kept differently {differ}")
    save_rows(args.output_json, out)


if __name__ == "__main__":
    main()
