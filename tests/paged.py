"""Test helper: run a model over ragged batches with a simple page allocator (no scheduler)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.parallel import ShardingRules, kv_cache_sharding, make_mesh, padded_layers
from pallas_kernels import AttentionMetadata, kv_cache_shape


class PagedRunner:
    """Keeps one KV cache and per-sequence page lists; `step` feeds new tokens for some sequences."""

    def __init__(self, model: nnx.Module, page_size: int, num_pages: int = 64, pages_per_seq: int = 16,
                 max_seqs: int = 8, mesh: Mesh | None = None):
        cfg = model.cfg
        self.page_size, self.pages_per_seq, self.max_seqs = page_size, pages_per_seq, max_seqs
        mesh = mesh or make_mesh()
        layers = padded_layers(cfg.num_layers, mesh.shape["pipeline"])  # as the engine's runner allocates it
        shape = kv_cache_shape(layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        cache_sharding = kv_cache_sharding(shape, mesh, ShardingRules())
        self.kv_cache = jax.device_put(jnp.zeros(shape, cfg.jnp_dtype), cache_sharding)
        self.graphdef, self.state = nnx.split(model)
        # Pages handed out in a scrambled order so that tables are not the identity.
        self.free = list(np.random.default_rng(0).permutation(num_pages))
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self._step = jax.jit(self._forward, donate_argnums=(1,), out_shardings=(None, cache_sharding))

    def _forward(self, state, kv_cache, tokens, positions, md):
        model = nnx.merge(self.graphdef, state)
        hidden, kv_cache = model(tokens, positions, kv_cache, md)
        return model.compute_logits(hidden), kv_cache

    def step(self, feeds: dict[int, list[int]], pad_tokens: int = 0) -> dict[int, np.ndarray]:
        """Append `feeds[seq]` tokens to each sequence; returns each sequence's logits `[len(feed), V]`."""
        tokens, positions, cu, kv_lens, table = [], [], [0], [], np.zeros((self.max_seqs, self.pages_per_seq),
                                                                            np.int32)
        for row, (seq, feed) in enumerate(feeds.items()):
            start = self.lens.get(seq, 0)
            self.lens[seq] = start + len(feed)
            pages = self.pages.setdefault(seq, [])
            while len(pages) * self.page_size < self.lens[seq]:
                pages.append(self.free.pop())
            tokens += feed
            positions += range(start, self.lens[seq])
            cu.append(len(tokens))
            kv_lens.append(self.lens[seq])
            table[row, :len(pages)] = pages
        n = len(feeds)
        total = len(tokens) + pad_tokens
        md = AttentionMetadata(
            cu_q_lens=jnp.asarray(cu + [cu[-1]] * (self.max_seqs - n), jnp.int32),
            kv_lens=jnp.asarray(kv_lens + [0] * (self.max_seqs - n), jnp.int32),
            page_indices=jnp.asarray(table),
            num_seqs=jnp.asarray([n], jnp.int32),
        )
        tok = jnp.asarray(tokens + [0] * pad_tokens, jnp.int32)
        pos = jnp.asarray(positions + [0] * pad_tokens, jnp.int32)
        logits, self.kv_cache = self._step(self.state, self.kv_cache, tok, pos, md)
        logits = np.asarray(logits)
        assert total == logits.shape[0]
        return {seq: logits[cu[r]:cu[r + 1]] for r, seq in enumerate(feeds)}
