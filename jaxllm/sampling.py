"""Sampling on the device: penalties, temperature, min-p, top-k, top-p, seeded per-request draws, logprobs.

Every row is processed on its own, with its own PRNG key derived from `(seed, step)`, so a request's tokens
do not depend on what else is in the batch. The order follows vLLM: penalties and the `min_tokens` ban on
the raw logits; greedy rows take the argmax; other rows are divided by the temperature, filtered by min-p,
then top-k, then top-p, and drawn by the Gumbel-max trick. Logprobs are those of the raw model output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.sampling_params import GREEDY_EPS

_NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per-row sampling settings; rows are the batch's sequences (padding rows: greedy, no penalties)."""

    temperature: jax.Array  # [S] f32
    top_p: jax.Array  # [S] f32
    top_k: jax.Array  # [S] i32, 0 = off
    min_p: jax.Array  # [S] f32
    presence_penalty: jax.Array  # [S] f32
    frequency_penalty: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32
    seeds: jax.Array  # [S] u32
    steps: jax.Array  # [S] i32, index of the token being sampled among the outputs
    history: jax.Array  # [S, H] i32, prompt then output tokens, -1 padded
    prompt_lens: jax.Array  # [S] i32
    banned: jax.Array  # [S, B] i32, token ids that may not be sampled now (min_tokens), -1 padded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, raw logprob of the sampled token
    ranks: jax.Array  # [S] i32, 1 + number of tokens more likely
    top_ids: jax.Array  # [S, N] i32
    top_logprobs: jax.Array  # [S, N] f32


def apply_penalties(logits: jax.Array, inp: SamplingInputs) -> jax.Array:
    """Repetition (prompt and output), frequency and presence (output) penalties, and the min_tokens ban."""
    num_rows, vocab = logits.shape
    history = inp.history
    positions = jnp.arange(history.shape[1])[None, :]
    slot = jnp.where(history >= 0, history, vocab)  # padding counts into a spare column
    is_output = (positions >= inp.prompt_lens[:, None]).astype(jnp.int32)
    rows = jnp.arange(num_rows)[:, None]
    counts = jnp.zeros((num_rows, vocab + 1), jnp.int32).at[rows, slot].add(is_output)[:, :vocab]
    seen = jnp.zeros((num_rows, vocab + 1), jnp.bool_).at[rows, slot].set(True)[:, :vocab]
    rep = inp.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - inp.frequency_penalty[:, None] * counts
    logits = logits - inp.presence_penalty[:, None] * (counts > 0)
    banned = jnp.where(inp.banned >= 0, inp.banned, vocab)
    is_banned = jnp.zeros((num_rows, vocab + 1), jnp.bool_).at[rows, banned].set(True)[:, :vocab]
    return jnp.where(is_banned, _NEG_INF, logits)


def filter_logits(scaled: jax.Array, inp: SamplingInputs) -> jax.Array:
    """Temperature-scaled logits with tokens outside min-p, top-k and top-p set to -inf."""
    probs = jax.nn.softmax(scaled, axis=-1)
    scaled = jnp.where(probs < inp.min_p[:, None] * probs.max(axis=-1, keepdims=True), _NEG_INF, scaled)
    ordered = -jnp.sort(-scaled, axis=-1)
    vocab = scaled.shape[-1]
    kth = jnp.take_along_axis(ordered, jnp.clip(inp.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    kth = jnp.where(inp.top_k[:, None] > 0, kth, _NEG_INF)
    ordered = jnp.where(ordered < kth, _NEG_INF, ordered)
    sorted_probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly more likely tokens
    kept = before < inp.top_p[:, None]
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((scaled < threshold) | (scaled < kth), _NEG_INF, scaled)


def _needs_filter(inp: SamplingInputs) -> jax.Array:
    return jnp.any((inp.top_k > 0) | (inp.top_p < 1.0) | (inp.min_p > 0.0))


def sample(logits: jax.Array, inp: SamplingInputs, num_logprobs: int) -> SampleResult:
    """Draw one token per row from `logits [S, V]` (float32)."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    logits = apply_penalties(logits, inp)
    greedy = inp.temperature < GREEDY_EPS
    scaled = logits / jnp.where(greedy, 1.0, inp.temperature)[:, None]
    scaled = jax.lax.cond(_needs_filter(inp), filter_logits, lambda s, _: s, scaled, inp)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(inp.seeds, inp.steps)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    drawn = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    token_logprobs = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(raw > token_logprobs[:, None], axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(raw, num_logprobs)
    return SampleResult(tokens, token_logprobs, ranks, top_ids.astype(jnp.int32), top_logprobs)
