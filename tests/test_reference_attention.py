"""The reference ragged paged attention against a naive dense attention on random ragged batches, with
caches in the model's dtype and of 8-bit floats (stored as bytes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import AttentionMetadata, kv_cache_shape, ragged_paged_attention, reference
from pallas_kernels.reference import to_cache_dtype

CACHE_8BIT = [jnp.float8_e4m3fn, jnp.float8_e5m2]


def random_batch(rng, q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, page_size, num_layers=2,
                 max_seqs=6, pad_tokens=3):
    """A ragged batch whose sequences already hold `ctx - q` tokens in scattered pages of a random cache."""
    pages_per_seq = -(-max(ctx_lens) // page_size) + 1
    num_pages = len(q_lens) * pages_per_seq + 2
    cache = rng.standard_normal(kv_cache_shape(num_layers, num_pages, page_size, num_kv_heads, head_dim))
    order = rng.permutation(num_pages)
    table = np.zeros((max_seqs, pages_per_seq), np.int32)
    for s in range(len(q_lens)):
        table[s] = order[s * pages_per_seq:(s + 1) * pages_per_seq]
    total = sum(q_lens) + pad_tokens
    q = rng.standard_normal((total, num_heads, head_dim))
    k = rng.standard_normal((total, num_kv_heads, head_dim))
    v = rng.standard_normal((total, num_kv_heads, head_dim))
    cu = np.concatenate([[0], np.cumsum(q_lens), np.full(max_seqs - len(q_lens), sum(q_lens))])
    md = AttentionMetadata(
        cu_q_lens=jnp.asarray(cu, jnp.int32),
        kv_lens=jnp.asarray(list(ctx_lens) + [0] * (max_seqs - len(q_lens)), jnp.int32),
        page_indices=jnp.asarray(table),
        num_seqs=jnp.asarray([len(q_lens)], jnp.int32),
    )
    return q, k, v, cache, md


def dense_attention(q, k, v, cache, md, layer, sm_scale, sliding_window=None, soft_cap=None):
    """Per sequence: gather its K/V densely (cached prefix + new rows), softmax with an explicit mask."""
    cu, kv_lens, table = (np.asarray(x) for x in (md.cu_q_lens, md.kv_lens, md.page_indices))
    group = q.shape[1] // k.shape[1]
    out = np.zeros_like(q)
    for s in range(int(md.num_seqs[0])):
        q_len, kv_len = cu[s + 1] - cu[s], kv_lens[s]
        pages = cache[layer, table[s]].reshape(-1, cache.shape[3], cache.shape[4])[:kv_len]
        keys, vals = pages[:, 0::2].copy(), pages[:, 1::2].copy()
        keys[kv_len - q_len:], vals[kv_len - q_len:] = k[cu[s]:cu[s + 1]], v[cu[s]:cu[s + 1]]
        keys, vals = np.repeat(keys, group, axis=1), np.repeat(vals, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q[cu[s]:cu[s + 1]], keys) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        qpos = np.arange(kv_len - q_len, kv_len)[:, None]
        kpos = np.arange(kv_len)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        scores = np.where(mask[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[cu[s]:cu[s + 1]] = np.einsum("hqk,khd->qhd", probs, vals)
    return out


CASES = [
    # q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, window, soft_cap
    ([1, 1, 1], [1, 17, 40], 4, 4, 16, 8, None, None),  # decode only, MHA
    ([7, 1, 12, 3], [7, 30, 12, 19], 8, 2, 32, 4, None, None),  # mixed prefill/decode, GQA 4
    ([5, 9], [21, 9], 6, 3, 16, 16, None, None),  # prefill continuing a cached prefix
    ([9, 1, 4], [9, 25, 20], 4, 1, 16, 4, 6, None),  # sliding window, MQA
    ([3, 6], [11, 6], 4, 2, 64, 8, None, 5.0),  # logit soft-cap
    ([16, 2, 1, 1, 8], [40, 33, 2, 16, 8], 8, 4, 128, 16, 10, 30.0),  # everything at once
]


@pytest.mark.parametrize("q_lens,ctx_lens,h,kvh,d,page,window,cap", CASES)
def test_matches_dense_attention(q_lens, ctx_lens, h, kvh, d, page, window, cap):
    rng = np.random.default_rng(sum(ctx_lens))
    q, k, v, cache, md = random_batch(rng, q_lens, ctx_lens, h, kvh, d, page)
    sm_scale = 0.7 / np.sqrt(d)
    layer = 1
    out, new_cache = ragged_paged_attention(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
        jnp.asarray(cache, jnp.float32), md, layer, sm_scale=sm_scale, sliding_window=window, soft_cap=cap)
    expected = dense_attention(q, k, v, cache, md, layer, sm_scale, window, cap)
    n = sum(q_lens)
    np.testing.assert_allclose(np.asarray(out)[:n], expected[:n], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out)[n:], 0.0)  # padding rows


def test_writes_new_kv_into_pages_and_nothing_else():
    rng = np.random.default_rng(1)
    q_lens, ctx_lens, page = [3, 1], [5, 9], 4
    q, k, v, cache, md = random_batch(rng, q_lens, ctx_lens, 4, 2, 8, page)
    _, new_cache = ragged_paged_attention(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
        jnp.asarray(cache, jnp.float32), md, 0, sm_scale=1.0)
    new_cache = np.asarray(new_cache)
    expected = cache.astype(np.float32).copy()
    table, row = np.asarray(md.page_indices), 0
    for s, (q_len, kv_len) in enumerate(zip(q_lens, ctx_lens)):
        for pos in range(kv_len - q_len, kv_len):
            slot = expected[0, table[s, pos // page], pos % page]
            slot[0::2], slot[1::2] = k[row], v[row]
            row += 1
    np.testing.assert_allclose(new_cache, expected, rtol=1e-6)


def test_bfloat16_close_to_float32():
    rng = np.random.default_rng(2)
    q, k, v, cache, md = random_batch(rng, [6, 1, 1], [6, 20, 33], 8, 2, 64, 16)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, cache)]
    out, new_cache = ragged_paged_attention(*args, md, 0, sm_scale=0.125)
    assert out.dtype == jnp.bfloat16 and new_cache.dtype == jnp.bfloat16
    expected = dense_attention(*(np.asarray(a, np.float32) for a in args), md, 0, 0.125)
    np.testing.assert_allclose(np.asarray(out, np.float32)[:8], expected[:8], rtol=2e-2, atol=2e-2)


def attend_8bit_cache(impl, q_lens, ctx, h, kvh, d, page, window, cap, *, cache_dtype, q_dtype=jnp.bfloat16,
                      **kwargs):
    """`impl` (a backend's `ragged_paged_attention`) on a random batch whose cache holds `cache_dtype` values as
    bytes, and the dense attention of the values that cache holds (this step's K/V rounded as they are written).
    Returns `(out, expected, real rows, the new cache, the reference's new cache)`, the caches as values."""
    rng = np.random.default_rng(sum(ctx) + d + h)
    q, k, v, cache, md = random_batch(rng, q_lens, ctx, h, kvh, d, page, max_seqs=len(q_lens) + 1)
    q, k, v = (jnp.asarray(x, q_dtype) for x in (q, k, v))
    values = to_cache_dtype(jnp.asarray(3 * cache), cache_dtype)  # values up to ~15: e5m2's coarse steps show
    cache = jax.lax.bitcast_convert_type(values, jnp.uint8)
    fmt, sm_scale = jnp.dtype(cache_dtype).name, 0.7 / np.sqrt(d)
    out, new_cache = impl(q, k, v, cache, md, 1, sm_scale=sm_scale, sliding_window=window, soft_cap=cap,
                          cache_format=fmt, **kwargs)
    _, ref_cache = reference.ragged_paged_attention(q, k, v, cache, md, 1, sm_scale=sm_scale, cache_format=fmt)
    stored = [np.asarray(to_cache_dtype(x, cache_dtype), np.float32) for x in (k, v)]
    expected = dense_attention(np.asarray(q, np.float32), *stored, np.asarray(values, np.float32), md, 1, sm_scale,
                               window, cap)
    assert new_cache.dtype == jnp.uint8
    as_values = [np.asarray(reference.cache_values(c, fmt), np.float32) for c in (new_cache, ref_cache)]
    return np.asarray(out, np.float32), expected, sum(q_lens), *as_values


def max_row_error(out, expected, n) -> float:
    """The largest relative error of a real query row."""
    return float((np.linalg.norm(out[:n] - expected[:n], axis=(1, 2))
                  / np.linalg.norm(expected[:n], axis=(1, 2))).max())


@pytest.mark.parametrize("cache_dtype", CACHE_8BIT)
@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_8bit_cache_matches_dense_attention_of_its_values(case, cache_dtype):
    out, expected, n, _, _ = attend_8bit_cache(ragged_paged_attention, *case, cache_dtype=cache_dtype,
                                               backend="reference")
    assert max_row_error(out, expected, n) < 1e-2  # bfloat16 queries and output
    np.testing.assert_array_equal(out[n:], 0.0)


@pytest.mark.parametrize("cache_dtype,largest", [(jnp.float8_e4m3fn, 448.0), (jnp.float8_e5m2, 57344.0)])
def test_8bit_cache_writes_saturate(cache_dtype, largest):
    """K/V beyond the format's range are stored as its largest finite value, signed, never NaN or infinity."""
    rng = np.random.default_rng(4)
    q, k, v, cache, md = random_batch(rng, [2], [2], 2, 1, 8, 4)
    k = np.full_like(k, 1e6)
    v = np.full_like(v, -1e6)
    fmt = jnp.dtype(cache_dtype).name
    _, new_cache = ragged_paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          jnp.zeros(cache.shape, jnp.uint8), md, 0, sm_scale=1.0, cache_format=fmt)
    page = int(md.page_indices[0, 0])
    written = np.asarray(reference.cache_values(new_cache[0, page, :2], fmt), np.float32)
    np.testing.assert_array_equal(written[:, 0], largest)
    np.testing.assert_array_equal(written[:, 1], -largest)


@pytest.mark.parametrize("cache,cache_format", [(jnp.uint8, None), (jnp.float32, "float8_e4m3fn")])
def test_a_byte_cache_and_only_it_takes_a_cache_format(cache, cache_format):
    q, k, v, cache_values, md = random_batch(np.random.default_rng(5), [1], [3], 2, 1, 8, 4)
    with pytest.raises(ValueError, match="a cache of bytes needs its 8-bit float cache_format"):
        ragged_paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.zeros(cache_values.shape, cache),
                               md, 0, sm_scale=1.0, cache_format=cache_format)
