"""On-device sampling: filtered distributions (chi-square), penalties, seeds, bans and logprobs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from jaxllm.sampling import (
    SamplerKind,
    SamplingInputs,
    apply_penalties,
    empty_penalty_state,
    filter_logits,
    record,
    reset_row,
    sample,
    top_k_by_chunks,
)

VOCAB = 40


def inputs(rows, banned=None, min_tokens=0, want_logprobs=True, **values):
    def col(name, default, dtype):
        return jnp.asarray(np.broadcast_to(values.get(name, default), (rows,)), dtype)
    return SamplingInputs(
        temperature=col("temperature", 1.0, jnp.float32), top_p=col("top_p", 1.0, jnp.float32),
        top_k=col("top_k", 0, jnp.int32), min_p=col("min_p", 0.0, jnp.float32),
        presence_penalty=col("presence", 0.0, jnp.float32), frequency_penalty=col("frequency", 0.0, jnp.float32),
        repetition_penalty=col("repetition", 1.0, jnp.float32), seeds=col("seeds", 0, jnp.uint32),
        steps=col("steps", 0, jnp.int32), slots=jnp.arange(rows, dtype=jnp.int32),
        min_tokens=col("min_tokens", min_tokens, jnp.int32),
        banned=jnp.asarray(np.full((rows, 4), -1) if banned is None else banned, jnp.int32),
        want_logprobs=jnp.asarray(want_logprobs))


def penalty_state(history=None, prompt_lens=0, rows=1):
    """Per-row statistics of `history [rows, L]` (prompt then outputs, -1 padded), as the engine keeps them."""
    history = np.full((rows, 8), -1) if history is None else np.asarray(history)
    lens = np.broadcast_to(prompt_lens, (len(history),))
    state = empty_penalty_state(len(history), VOCAB)
    for row, (tokens, prompt_len) in enumerate(zip(history, lens)):
        state = reset_row(state, row, jnp.asarray(tokens, jnp.int32), prompt_len)
    return state


def filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Independent numpy statement of the filters: min-p, then top-k, then top-p, on tempered logits."""
    scaled = logits / temperature
    scaled = scaled.astype(np.float64)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()
    order = np.argsort(-scaled, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    kept_probs = np.where(keep, probs, 0)
    kept_probs /= kept_probs.sum()
    mass_before = np.cumsum(kept_probs[order]) - kept_probs[order]
    keep[order[mass_before >= top_p]] = False
    out = np.where(keep, probs, 0)
    return out / out.sum()


@pytest.mark.parametrize("settings", [
    dict(top_k=5), dict(top_p=0.6), dict(min_p=0.15), dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.02),
    dict(temperature=1.5),
])
def test_sampled_frequencies_match_filtered_softmax(settings):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, VOCAB).astype(np.float32)
    draws = 6000
    params = dict(settings)
    inp = inputs(draws, seeds=123, steps=np.arange(draws), **params)
    state = penalty_state(rows=draws)
    tokens = np.asarray(jax.jit(lambda x, i, s: sample(x, i, s, 4).tokens)(jnp.tile(logits, (draws, 1)), inp, state))
    expected = filtered_probs(logits, **params)
    counts = np.bincount(tokens, minlength=VOCAB)
    assert counts[expected == 0].sum() == 0, "sampled a filtered-out token"
    support = expected > 0
    f_exp = expected[support] / expected[support].sum() * counts.sum()
    assert chisquare(counts[support], f_exp).pvalue > 1e-3


def _num_conds(kind: SamplerKind, inp: SamplingInputs, state) -> int:
    jaxpr = jax.make_jaxpr(lambda x: sample(x, inp, state, 3, kind))(jnp.zeros((inp.seeds.shape[0], VOCAB)))
    return sum(eqn.primitive.name == "cond" for eqn in jaxpr.eqns)


def test_samplers_picked_on_the_host_give_the_run_time_samplers_results_without_its_branches():
    """The samplers multi-step decode picks on the host: full (filter and ranks for every row) equals the
    run-time one on a batch where some rows filter and others keep their whole vocabulary, and so does
    filter (without ranks), and top-p (min-p and top-p only) where no row uses top-k; plain equals it where
    no row filters or wants logprobs. None has a `cond` (XLA:GPU's host waits on them), where the run-time
    one has its two."""
    rows = 6 * 32  # six settings, 32 seeds each
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(0, 2, (rows, VOCAB)).astype(np.float32))
    state = penalty_state(rows=rows)
    common = dict(seeds=np.arange(rows) * 7, steps=np.arange(rows),
                  temperature=np.repeat([0.0, 1.0, 0.8, 1.2, 1.0, 0.9], 32))
    mixed = inputs(rows, top_k=np.repeat([0, 4, 0, 0, 0, 0], 32), top_p=np.repeat([1.0, 1.0, 0.6, 1.0, 1.0, 1.0], 32),
                   min_p=np.repeat([0.0, 0.0, 0.0, 0.1, 0.0, 0.0], 32), **common)
    unfiltered = inputs(rows, want_logprobs=False, **common)
    unranked = dataclasses.replace(mixed, want_logprobs=jnp.asarray(False))
    no_top_k = dataclasses.replace(unranked, top_k=jnp.zeros(rows, jnp.int32))
    for kind, inp in ((SamplerKind.FULL, mixed), (SamplerKind.FILTER, unranked), (SamplerKind.TOP_P, no_top_k),
                      (SamplerKind.PLAIN, unfiltered)):
        got, want = sample(logits, inp, state, 3, kind), sample(logits, inp, state, 3)
        for name in ("tokens", "logprobs", "ranks", "top_ids", "top_logprobs"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), name)
        assert _num_conds(kind, inp, state) == 0 < _num_conds(SamplerKind.RUN_TIME, inp, state) == 2


def test_top_p_of_one_keeps_tokens_whose_mass_rounds_away():
    """A row with top-p 1.0 in a batch that filters keeps every token, even where the float32 cumulative
    mass reaches 1 before the tail (the tail's probabilities are below its rounding)."""
    logits = np.zeros((2, VOCAB), np.float32)
    logits[:, 0] = 30.0
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), inputs(2, top_p=[1.0, 0.5]))))
    assert kept[0].all() and kept[1].sum() == 1


def kept_by_sorting(row: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The filters' kept tokens by value, in float64 from a sorted row: min-p; top-k keeping every token tied
    with the k-th; top-p keeping each value whose strictly larger survivors hold less than `top_p`."""
    x = row.astype(np.float64)
    probs = np.exp(x - x.max())
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    keep = np.ones(len(x), bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][min(top_k, len(x)) - 1]
    weights = np.where(keep, np.exp(x - x.max()), 0.0)
    weights /= weights.sum()
    above = np.array([weights[x > v].sum() for v in x])
    return keep & (above < top_p) if top_p < 1 else keep


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.9, 0.0), (0, 0.3, 0.0), (7, 1.0, 0.0), (7, 0.5, 0.0),
                                                (300, 0.95, 0.0), (0, 0.8, 0.05), (5000, 0.7, 0.0)])
def test_filter_keeps_the_tokens_a_sort_keeps(top_k, top_p, min_p):
    """The sort-free filter (searches over the rows' values) against a float64 statement from sorted rows, on
    2,000-token rows with many ties, banned (-inf) tokens, and a top-k above the row's finite tokens."""
    rng = np.random.default_rng(top_k + int(100 * top_p))
    rows = np.round(rng.normal(0, 2, (6, 2000)) * 4) / 4  # values on a grid of 0.25: ties everywhere
    rows[1, ::3] = -np.inf
    rows[2, 10:] = -np.inf  # 10 finite tokens
    rows[3, :40] = rows[3].max() + 1  # 40 tokens tied at the top
    rows = rows.astype(np.float32)
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(rows), inputs(6, top_k=top_k, top_p=top_p,
                                                                        min_p=min_p))))
    for row, kept in zip(rows, got):
        want = kept_by_sorting(row, top_k, top_p, min_p) & np.isfinite(row)
        np.testing.assert_array_equal(kept, want)


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, VOCAB)).astype(np.float32)
    history = np.array([[1, 5, 5, 9, -1, -1, -1, -1], [2, 3, 30, 31, 2, -1, -1, -1]])
    ours = apply_penalties(jnp.asarray(logits), inputs(2, repetition=1.3), penalty_state(history, [2, 3]))
    for row in range(2):
        ids = torch.tensor([[t for t in history[row] if t >= 0]])
        ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.tensor(logits[row:row + 1]))
        np.testing.assert_allclose(np.asarray(ours[row]), ref[0].numpy(), rtol=1e-6)


def test_frequency_and_presence_penalties_count_outputs_only():
    logits = np.zeros((1, VOCAB), np.float32)
    history = np.array([[4, 4, 6, 6, 6, 7, -1, -1]])  # prompt [4, 4], output [6, 6, 6, 7]
    out = np.asarray(apply_penalties(jnp.asarray(logits), inputs(1, frequency=0.5, presence=0.25),
                                     penalty_state(history, 2)))
    assert out[0, 4] == 0.0
    assert out[0, 6] == pytest.approx(-(0.5 * 3 + 0.25))
    assert out[0, 7] == pytest.approx(-(0.5 + 0.25))


def test_banned_tokens_are_never_drawn_and_greedy_takes_the_next_best():
    logits = np.zeros((2, VOCAB), np.float32)
    logits[:, 3], logits[:, 8] = 10.0, 9.0
    banned = np.array([[3, -1, -1, -1], [3, 8, -1, -1]])
    result = sample(jnp.asarray(logits), inputs(2, banned=banned, temperature=0.0, min_tokens=1),
                    penalty_state(rows=2), 2)
    assert list(np.asarray(result.tokens)) == [8, int(np.argmax(np.where(np.isin(np.arange(VOCAB), [3, 8]), -1,
                                                                         logits[1])))]


def test_seeded_rows_do_not_depend_on_the_batch():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (8, VOCAB)).astype(np.float32)
    batch = inputs(8, seeds=np.arange(8) * 11, steps=np.arange(8), temperature=0.9, top_p=0.95)
    together = np.asarray(sample(jnp.asarray(logits), batch, penalty_state(rows=8), 2).tokens)
    for row in range(8):
        alone = inputs(1, seeds=row * 11, steps=row, temperature=0.9, top_p=0.95)
        assert int(sample(jnp.asarray(logits[row:row + 1]), alone, penalty_state(), 2).tokens[0]) == together[row]


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (3, VOCAB)).astype(np.float32)
    result = sample(jnp.asarray(logits), inputs(3, temperature=0.0, repetition=2.0), penalty_state(rows=3), 5)
    raw = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(np.asarray(result.top_logprobs), -np.sort(-np.asarray(raw))[:, :5], rtol=1e-6)
    chosen = np.asarray(result.tokens)
    np.testing.assert_allclose(np.asarray(result.logprobs), np.asarray(raw)[np.arange(3), chosen], rtol=1e-6)
    assert all(np.asarray(result.ranks) >= 1)


@pytest.mark.parametrize("width,k", [(1000, 20), (512, 7), (300, 256), (200, 20)])
def test_top_k_by_chunks_is_lax_top_k(width, k):
    """The two-round top k gives `lax.top_k`'s values and ids, ties (many here) included."""
    x = jnp.asarray(np.random.default_rng(width).integers(0, 40, (5, width)), jnp.float32)
    values, ids = top_k_by_chunks(x, k)
    want_values, want_ids = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))


def test_recorded_samples_match_a_history_that_contains_them():
    """Counting sampled tokens on the device as they come equals recounting the whole history."""
    prompt, outputs = [4, 4, 9], [6, 6, 7, 9]
    state = penalty_state(np.array([prompt + [-1] * 5]), 3)
    for token in outputs:
        state = record(state, jnp.array([0, 0]), jnp.array([token, 1]), jnp.array([True, False]))
    expected = penalty_state(np.array([prompt + outputs + [-1]]), 3)
    np.testing.assert_array_equal(np.asarray(state.output_counts), np.asarray(expected.output_counts))
    np.testing.assert_array_equal(np.asarray(state.prompt_mask), np.asarray(expected.prompt_mask))


def test_ban_lifts_once_min_tokens_are_sampled():
    logits = np.zeros((2, VOCAB), np.float32)
    logits[:, 3] = 10.0
    banned = np.array([[3, -1, -1, -1]] * 2)
    result = sample(jnp.asarray(logits), inputs(2, banned=banned, temperature=0.0, min_tokens=2, steps=[1, 2]),
                    penalty_state(rows=2), 2)
    assert list(np.asarray(result.tokens)) == [int(np.argmax(np.where(np.arange(VOCAB) == 3, -1, logits[0]))), 3]
