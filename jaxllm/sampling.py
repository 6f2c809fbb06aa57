"""Sampling on the device: penalties, temperature, min-p, top-k, top-p, seeded per-request draws, logprobs.

Every row is processed on its own, with its own PRNG key derived from `(seed, step)`, so a request's tokens
do not depend on what else is in the batch. The order follows vLLM: penalties and the `min_tokens` ban on
the raw logits; greedy rows take the argmax; other rows are divided by the temperature, filtered by min-p,
then top-k, then top-p, and drawn by the Gumbel-max trick. Logprobs are those of the raw model output.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp

from jaxllm.sampling_params import GREEDY_EPS

_NEG_INF = -jnp.inf


class SamplerKind(str, enum.Enum):
    """How a compiled sampler handles the costly optional stages: the top-k/top-p/min-p filter (searches over
    every row's values: about 1.7 ms at 256 rows of 128k tokens on an H100 for min-p and top-p, 2.6 ms with
    top-k) and the ranks and top logprobs (a top k of every row). XLA:GPU decides a `cond` on the host,
    waiting for the device to get there, so a program with these `cond`s keeps the host from queuing the next
    step ahead (10-14 ms of each 8-step call at 256 sequences): multi-step decode programs, which the runner
    picks per batch, decide on the host instead."""

    RUN_TIME = "run_time"  # each stage under a `cond` on whether some row needs it (one program for all batches)
    PLAIN = "plain"  # no stage: no row of the batch filters or wants logprobs
    TOP_P = "top_p"  # min-p and top-p for every row (rows that do not filter keep their whole vocabulary)
    FILTER = "filter"  # min-p, top-k and top-p for every row, no ranks
    FULL = "full"  # the whole filter and the ranks for every row, no `cond`


@dataclasses.dataclass(frozen=True)
class _Stages:
    """What a `SamplerKind` computes: the filter and the ranks (None: a run-time `cond` decides), and whether
    the filter searches for top-k's threshold."""

    filter: bool | None
    top_k: bool
    ranks: bool | None


_STAGES = {SamplerKind.RUN_TIME: _Stages(None, True, None), SamplerKind.PLAIN: _Stages(False, False, False),
           SamplerKind.TOP_P: _Stages(True, False, False), SamplerKind.FILTER: _Stages(True, True, False),
           SamplerKind.FULL: _Stages(True, True, True)}


def _stage(static: bool | None, needed: jax.Array, apply, skip, *args):
    """`apply(*args)` or `skip(*args)`: as `static` says, or on `needed` at run time where it is None."""
    if static is None:
        return jax.lax.cond(needed, apply, skip, *args)
    return (apply if static else skip)(*args)


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
    slots: jax.Array  # [S] i32, the row of `PenaltyState` that holds the sequence's token statistics
    min_tokens: jax.Array  # [S] i32, `banned` applies while `steps < min_tokens`
    banned: jax.Array  # [S, B] i32, token ids that may not be sampled before min_tokens (EOS, stops), -1 padded
    want_logprobs: jax.Array  # [] bool, whether any row reports ranks and top logprobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, raw logprob of the sampled token
    ranks: jax.Array  # [S] i32, 1 + number of tokens more likely (0 unless want_logprobs)
    top_ids: jax.Array  # [S, N] i32
    top_logprobs: jax.Array  # [S, N] f32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    """Token statistics of each running sequence, kept on the device across steps (vLLM's persistent batch
    rows): a row per scheduler slot, so the host never sends a token history. A row is set from the
    sequence's tokens when it takes the slot (`reset_row`) and then grows by the tokens it samples (`record`).
    Size: max_num_seqs x vocab x 5 bytes, 164 MiB for 256 x 128k (0.2% of an 80 GB GPU, some 1,300 tokens of
    an 8B model's KV cache); it is allocated before the KV cache is sized, so the budget accounts for it.
    Every step reads the rows of its sequences (at 256 x 128k, 164 MB: about 55 us on an H100) and scatters
    one token per row into them.
    """

    output_counts: jax.Array  # [R, V] i32, times each token was sampled (frequency and presence penalties)
    prompt_mask: jax.Array  # [R, V] bool, tokens of the prompt (repetition penalty, with the outputs)


def empty_penalty_state(num_rows: int, vocab: int) -> PenaltyState:
    return PenaltyState(jnp.zeros((num_rows, vocab), jnp.int32), jnp.zeros((num_rows, vocab), jnp.bool_))


def reset_row(state: PenaltyState, slot: jax.Array, tokens: jax.Array, prompt_len: jax.Array) -> PenaltyState:
    """Row `slot` := the statistics of `tokens [L]` (prompt then outputs, -1 padded)."""
    vocab = state.output_counts.shape[1]
    ids = jnp.where(tokens >= 0, tokens, vocab)  # padding counts into a spare column
    is_output = (jnp.arange(tokens.shape[0]) >= prompt_len).astype(jnp.int32)
    counts = jnp.zeros(vocab + 1, jnp.int32).at[ids].add(is_output)[:vocab]
    prompt = jnp.zeros(vocab + 1, jnp.bool_).at[jnp.where(is_output == 0, ids, vocab)].set(True)[:vocab]
    return PenaltyState(state.output_counts.at[slot].set(counts), state.prompt_mask.at[slot].set(prompt))


def record(state: PenaltyState, slots: jax.Array, tokens: jax.Array, keep: jax.Array) -> PenaltyState:
    """Count `tokens [S]` as sampled by the sequences in `slots` where `keep` (others are dropped)."""
    rows = jnp.where(keep, slots, state.output_counts.shape[0])
    return dataclasses.replace(state, output_counts=state.output_counts.at[rows, tokens].add(1, mode="drop"))


def apply_penalties(logits: jax.Array, inp: SamplingInputs, state: PenaltyState) -> jax.Array:
    """Repetition (prompt and output) penalty, frequency and presence (output) penalties."""
    counts = jnp.take(state.output_counts, inp.slots, axis=0, mode="clip")
    seen = jnp.take(state.prompt_mask, inp.slots, axis=0, mode="clip") | (counts > 0)
    rep = inp.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - inp.frequency_penalty[:, None] * counts
    return logits - inp.presence_penalty[:, None] * (counts > 0)


def ban_tokens(logits: jax.Array, inp: SamplingInputs) -> jax.Array:
    """The min_tokens ban: the `banned` ids of rows that have sampled fewer than `min_tokens` tokens."""
    num_rows, vocab = logits.shape
    banned = jnp.where((inp.banned >= 0) & (inp.steps < inp.min_tokens)[:, None], inp.banned, vocab)
    rows = jnp.arange(num_rows)[:, None]
    is_banned = jnp.zeros((num_rows, vocab + 1), jnp.bool_).at[rows, banned].set(True)[:, :vocab]
    return jnp.where(is_banned, _NEG_INF, logits)


def filter_logits(scaled: jax.Array, inp: SamplingInputs, top_k: bool = True) -> jax.Array:
    """Temperature-scaled logits with tokens outside min-p, top-k and top-p set to -inf. `top_k=False` skips
    top-k's search, for callers that know that no row uses top-k.

    Without sorting: top-k's k-th largest value and top-p's smallest kept value are found by searching the
    row's values (`_search_keys`), 11 passes over a row each. vLLM's order and ties: min-p, then top-k
    (every token tied with the k-th is kept), then top-p over the survivors' renormalised probabilities,
    keeping each value whose strictly more likely tokens hold less than `top_p` (so ties are kept together).
    Sorting every row cost 3.0 ms at 256 rows of 128k tokens on an H100 (`benchmarks/filter_search.py`)."""
    row_max = scaled.max(axis=-1, keepdims=True)  # no filter removes the most likely token
    scaled = jnp.where(jnp.exp(scaled - row_max) < inp.min_p[:, None], _NEG_INF, scaled)  # p < min_p * p_max
    keys = _ordered_keys(scaled)
    top = _ordered_keys(row_max[:, 0])
    vocab = scaled.shape[-1]

    def count_above(t):
        return jnp.sum(keys > t[:, None], axis=-1, dtype=jnp.int32)

    if top_k:
        kth = _search_keys(count_above, jnp.clip(inp.top_k, 1, vocab), top)
        kth = jnp.where(inp.top_k > 0, kth, 0)
    else:
        kth = jnp.zeros_like(top)
    weights = jnp.where(keys >= kth[:, None], jnp.exp(scaled - row_max), 0.0)

    def mass_above(t):
        return jnp.sum(jnp.where(keys > t[:, None], weights, 0.0), axis=-1)

    cut = _search_keys(mass_above, inp.top_p * weights.sum(axis=-1), top)
    cut = jnp.where(inp.top_p >= 1.0, 0, cut)  # float sums may reach the total before the tail
    return jnp.where(keys < jnp.maximum(kth, cut)[:, None], _NEG_INF, scaled)


_SEARCH_WAYS = 8  # parts a pass splits the keys left into: 7 probes a pass, 11 passes for 32-bit keys


def _ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-0 as +0), so that a search over integers is exact."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _search_keys(measure, target: jax.Array, top: jax.Array) -> jax.Array:
    """Per row, the smallest key t with `measure(t) < target`, where `measure` (of a row's tokens with keys
    above t) does not grow with t, `measure(0) >= target` and `measure(top) < target`. Each pass probes
    `_SEARCH_WAYS - 1` keys splitting what is left evenly; XLA computes their sums in one read of the rows.
    The passes are a `fori_loop`: unrolled, the 28 step programs took 13.1 s instead of 4.1 to load."""
    ways = _SEARCH_WAYS
    probes_at = jnp.arange(1, ways, dtype=jnp.uint32)

    def narrow(lo, hi):
        span = (hi - lo)[:, None]
        probes = lo[:, None] + span // ways * probes_at + jnp.minimum(probes_at, span % ways)
        measured = jnp.stack([measure(probes[:, j]) for j in range(ways - 1)], axis=1)
        passed = jnp.sum(measured >= target[:, None], axis=1)[:, None]  # probes still at or above target
        edges = jnp.concatenate([lo[:, None], probes, hi[:, None]], axis=1)
        return (jnp.take_along_axis(edges, passed, axis=1)[:, 0],
                jnp.take_along_axis(edges, passed + 1, axis=1)[:, 0])

    passes = -(-32 // (ways.bit_length() - 1))
    return jax.lax.fori_loop(0, passes, lambda _, bounds: narrow(*bounds), (jnp.zeros_like(top), top))[1]


def filters_any(top_k, top_p, min_p):
    """Whether any row keeps only part of the vocabulary (top-k, top-p or min-p): on the device (jax arrays)
    or on the host (numpy rows, to pick a program without the filter)."""
    return ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0)).any()


def _needs_filter(inp: SamplingInputs) -> jax.Array:
    return filters_any(inp.top_k, inp.top_p, inp.min_p)


def ranks_and_top(raw: jax.Array, token_logprobs: jax.Array, num: int):
    """Rank of each row's token (1 + the tokens more likely) and the `num` most likely ids and logprobs."""
    ranks = 1 + jnp.sum(raw > token_logprobs[:, None], axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = top_k_by_chunks(raw, num)
    return ranks, top_ids.astype(jnp.int32), top_logprobs


_TOP_K_CHUNK = 256


def top_k_by_chunks(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` over rows `[S, V]` in two rounds: the top k of each chunk of 256 columns, then the top
    k of those; exact, with its ties (the lower index first). On GPUs `lax.top_k` with k above 16 sorts whole
    rows (2.2 ms at 256 rows of 128k tokens on an H100), where the chunks' top k sorts short rows."""
    rows, width = x.shape
    chunks = -(-width // _TOP_K_CHUNK)
    if chunks < 2 or k > _TOP_K_CHUNK:
        return jax.lax.top_k(x, k)
    padded = jnp.pad(x, ((0, 0), (0, chunks * _TOP_K_CHUNK - width)), constant_values=-jnp.inf)
    values, ids = jax.lax.top_k(padded.reshape(rows, chunks, _TOP_K_CHUNK), k)
    ids = (ids + (jnp.arange(chunks) * _TOP_K_CHUNK)[None, :, None]).reshape(rows, chunks * k)
    top, where = jax.lax.top_k(values.reshape(rows, chunks * k), k)
    return top, jnp.take_along_axis(ids, where, axis=1)


def _no_ranks(raw: jax.Array, token_logprobs: jax.Array, num: int):
    rows = raw.shape[0]
    return jnp.zeros(rows, jnp.int32), jnp.zeros((rows, num), jnp.int32), jnp.zeros((rows, num), raw.dtype)


def sample(logits: jax.Array, inp: SamplingInputs, state: PenaltyState, num_logprobs: int,
           kind: SamplerKind = SamplerKind.RUN_TIME) -> SampleResult:
    """Draw one token per row from `logits [S, V]` (float32). Penalties and the ban apply to every row (a row
    without them keeps its logits exactly: x / 1, x - 0, nothing banned): under a `cond`, the branch that
    skipped them copied the logits (two `[256, 128256]` float32 copies a step on an H100, 0.17 ms) and made
    the host wait. The filter and the ranks are computed as `kind` (static) says."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    logits = ban_tokens(apply_penalties(logits, inp, state), inp)
    greedy = inp.temperature < GREEDY_EPS
    scaled = logits / jnp.where(greedy, 1.0, inp.temperature)[:, None]
    stages = _STAGES[kind]
    scaled = _stage(stages.filter, _needs_filter(inp), functools.partial(filter_logits, top_k=stages.top_k),
                    lambda s, _: s, scaled, inp)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(inp.seeds, inp.steps)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    drawn = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    token_logprobs = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    ranked = _stage(stages.ranks, inp.want_logprobs, functools.partial(ranks_and_top, num=num_logprobs),
                    functools.partial(_no_ranks, num=num_logprobs), raw, token_logprobs)
    return SampleResult(tokens, token_logprobs, *ranked)
