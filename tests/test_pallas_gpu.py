"""The Mosaic GPU kernel, run by JAX's GPU interpreter on CPU, against the dense reference on random ragged
batches, in bfloat16 and in float32 (computed as bfloat16 halves); its contract errors; backend choice.

The interpreter checks the kernel's semantics (TMA copies, barriers, wgmma, the split merge); Mosaic's
lowering and real timing are checked on an H100 by `benchmarks/attention.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxllm import LLM, SamplingParams
from pallas_kernels import gpu
from pallas_kernels.metadata import AttentionMetadata
from tests.test_reference_attention import CACHE_8BIT, attend_8bit_cache, dense_attention, max_row_error, random_batch
from tests.tiny_models import make_tiny

CASES = [
    # q_lens, ctx, heads, kv_heads, head_dim, page, window, soft_cap, splits
    ([1, 1, 1], [1, 17, 70], 8, 2, 64, 16, None, None, 1),  # decode, GQA 4, one split
    ([5, 1, 20], [70, 17, 20], 8, 2, 64, 16, None, None, 3),  # mixed prefill/decode, three KV splits
    ([9, 1, 12], [9, 40, 90], 7, 1, 64, 32, 20, None, None),  # G=7 (tiles of 8 tokens), sliding window
    ([3, 6], [130, 6], 2, 2, 128, 128, None, 5.0, 2),  # MHA, soft-cap, page larger than a KV block
    ([2, 1], [66, 3], 4, 2, 256, 64, None, None, None),  # head dim 256 (two stages fit)
    ([1], [700], 8, 2, 64, 16, None, None, None),  # one decode, long context: 4 splits, the merge's most one by one
    ([1, 1, 1, 1], [300, 17, 500, 64], 8, 2, 64, 16, None, None, None),  # 3 splits each; short ones leave some empty
    ([1, 1], [1500, 40], 8, 2, 64, 16, None, None, None),  # 8 splits each: the merge's masked window of 16
]


def run_kernel(q_lens, ctx, h, kvh, d, page, window, cap, splits, dtype=jnp.bfloat16):
    rng = np.random.default_rng(sum(ctx) + d + h)
    q, k, v, cache, md = random_batch(rng, q_lens, ctx, h, kvh, d, page, max_seqs=len(q_lens) + 1)
    args = [jnp.asarray(x, dtype) for x in (q, k, v, cache)]
    out, new_cache = gpu.ragged_paged_attention(*args, md, 1, sm_scale=0.7 / np.sqrt(d), sliding_window=window,
                                                soft_cap=cap, sizes=gpu.BlockSizes(num_splits=splits))
    expected = dense_attention(*(np.asarray(a, np.float32) for a in args), md, 1, 0.7 / np.sqrt(d), window, cap)
    return np.asarray(out, np.float32), expected, sum(q_lens)


@pytest.mark.parametrize("q_lens,ctx,h,kvh,d,page,window,cap,splits", CASES)
def test_matches_dense_attention(q_lens, ctx, h, kvh, d, page, window, cap, splits):
    out, expected, n = run_kernel(q_lens, ctx, h, kvh, d, page, window, cap, splits)
    row_err = np.linalg.norm(out[:n] - expected[:n], axis=(1, 2)) / np.linalg.norm(expected[:n], axis=(1, 2))
    assert row_err.max() < 1e-2  # every query row, at bfloat16 precision
    np.testing.assert_array_equal(out[n:], 0.0)  # padding rows


@pytest.mark.parametrize("dtype,splits,merged_by_kernel", [
    (jnp.bfloat16, 3, True), (jnp.bfloat16, 1, False), (jnp.float32, 3, False)])
def test_16bit_splits_are_merged_by_one_kernel(dtype, splits, merged_by_kernel):
    """KV splits of 16-bit outputs are merged by `merge_splits` (one kernel, not XLA's two); one split needs no
    merge, and float32 outputs keep XLA's (the values are checked against dense attention above)."""

    q, k, v, cache, md = random_batch(np.random.default_rng(0), [1, 3], [40, 20], 8, 2, 64, 16, max_seqs=3)
    args = [jnp.asarray(x, dtype) for x in (q, k, v, cache)]
    jaxpr = jax.make_jaxpr(lambda q, k, v, c: gpu.ragged_paged_attention(
        q, k, v, c, md, 1, sm_scale=0.1, sizes=gpu.BlockSizes(num_splits=splits)))(*args)
    names = [e.params.get("name") for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert ("merge_splits" in names) == merged_by_kernel, names


@pytest.mark.parametrize("sequences,longest,splits", [(1, 8192, 16), (1, 2048, 11), (1, 512, 3), (1, 576, 3),
                                                     (1, 640, 4), (1, 64, 1), (4, 1536, 5), (16, 512, 2),
                                                     (16, 2048, 2), (2, 8192, 9)])
def test_each_step_splits_few_long_contexts_more(sequences, longest, splits):
    """In the engine's smallest decode bucket (16 token and sequence slots; Llama-3-8B's 8 KV heads, a grid of 3
    splits a tile) a step's tiles take enough splits for about one block an SM, none shorter than three KV blocks of
    its longest context, and at most 16: one sequence of 8192 tokens gets 16 where the grid's own split count is 3.
    A fixed `num_splits` is kept as it is."""
    q_shape, cache = (16, 32, 128), jax.ShapeDtypeStruct((1, 16 * 512, 16, 16, 128), jnp.bfloat16)
    md = AttentionMetadata(cu_q_lens=jnp.zeros(17, jnp.int32), kv_lens=jnp.zeros(16, jnp.int32),
                           page_indices=jnp.zeros((16, 512), jnp.int32), num_seqs=jnp.ones(1, jnp.int32))
    shapes = gpu._plan(q_shape, cache, md, gpu.BlockSizes(), None)
    assert (shapes.num_splits, shapes.num_tiles, shapes.max_splits) == (3, 16, 16)
    assert int(shapes.splits_per_tile(jnp.int32(sequences), jnp.int32(longest))) == splits
    fixed = gpu._plan(q_shape, cache, md, gpu.BlockSizes(num_splits=3), None)
    assert int(fixed.splits_per_tile(jnp.int32(sequences), jnp.int32(longest))) == 3


def test_tiles_start_on_whole_tma_tiles():
    for group in (*range(1, 9), 10, 12, 14, 16, 32, 64):
        tokens = gpu.tokens_per_tile(group)
        assert tokens >= 1 and tokens * group <= gpu.ROWS and tokens * group % 8 == 0
    assert gpu.tokens_per_tile(9) == 0  # refused by the kernel with a clear error


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[6]])
def test_float32_close_to_float32_reference(case):
    out, expected, n = run_kernel(*case, dtype=jnp.float32)
    np.testing.assert_allclose(out[:n], expected[:n], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out[n:], 0.0)


@pytest.mark.parametrize("cache_dtype", CACHE_8BIT)
@pytest.mark.parametrize("case,q_dtype", [(CASES[1], jnp.bfloat16), (CASES[3], jnp.bfloat16),
                                          (CASES[2], jnp.float32)])
def test_8bit_cache_matches_dense_attention_of_its_values(case, q_dtype, cache_dtype):
    """An FP8 cache (`--kv-cache-dtype fp8`): K/V converted to float16 in the kernel, the same writes as the
    reference's, every row within float16/bfloat16 rounding of the attention of the cached values."""
    out, expected, n, new_cache, ref_cache = attend_8bit_cache(
        gpu.ragged_paged_attention, *case[:-1], cache_dtype=cache_dtype, q_dtype=q_dtype,
        sizes=gpu.BlockSizes(num_splits=case[-1]))
    np.testing.assert_array_equal(np.asarray(new_cache, np.float32), np.asarray(ref_cache, np.float32))
    assert max_row_error(out, expected, n) < 1e-2
    np.testing.assert_array_equal(out[n:], 0.0)


@pytest.mark.parametrize("q_dtype,cache_dtype", [(jnp.float16, jnp.bfloat16), (jnp.bfloat16, jnp.int8)])
def test_mixed_dtypes_are_refused_with_a_clear_error(q_dtype, cache_dtype):
    rng = np.random.default_rng(0)
    q, k, v, cache, md = random_batch(rng, [1], [5], 4, 2, 64, 16)
    with pytest.raises(NotImplementedError, match="a cache of their dtype or of float8_e4m3fn"):
        gpu.attend(jnp.asarray(q, q_dtype), jnp.asarray(cache, cache_dtype), md, 0, sm_scale=0.1,
                   sliding_window=None, soft_cap=None, sizes=gpu.BlockSizes())


def test_backend_selection():
    assert pallas_kernels.resolve_backend("pallas_gpu") == "pallas_gpu"
    assert pallas_kernels.resolve_backend("auto", jnp.bfloat16) == "reference"  # on CPU


@pytest.mark.parametrize("kv_cache_dtype,tolerance", [("auto", 1e-4), ("fp8", 2e-3)])
def test_engine_gives_the_reference_tokens(tmp_path, kv_cache_dtype, tolerance):
    """The interpreted kernel through the whole engine (float32, a sliding window, mixed prefill/decode):
    the same greedy tokens, and the same log-probabilities of them and of the prompts. With an FP8 cache both
    backends attend over the same 8-bit values; the kernel computes in float16, the reference in float32."""
    make_tiny("mistral", tmp_path / "model", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
              head_dim=64, vocab_size=160)
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": rng.integers(3, 160, n).tolist()} for n in (2, 21, 40)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    results = {}
    for backend in ("reference", "pallas_gpu"):
        llm = LLM(str(tmp_path / "model"), skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=32, num_gpu_blocks_override=32, attention_backend=backend,
                  kv_cache_dtype=kv_cache_dtype, compilation_cache_dir=str(tmp_path / "xla"))
        assert llm.llm_engine.runner.cache_format == llm.llm_engine.config.cache_dtype(jnp.float32)
        results[backend] = [(o.outputs[0].token_ids, _chosen_logprobs(o)) for o in
                            llm.generate(prompts, params, use_tqdm=False)]
    for (ref_tokens, ref_lp), (tokens, lp) in zip(results["reference"], results["pallas_gpu"]):
        assert tokens == ref_tokens
        np.testing.assert_allclose(lp, ref_lp, rtol=tolerance, atol=tolerance)


def test_norm_scales_are_folded_for_the_mosaic_gpu_kernels_only(tmp_path):
    """`load_model` folds the decoder norms' scales into the projections on the Mosaic GPU path (where a stacked
    scale sliced per layer cost XLA a copy and a wait), and leaves the reference path's model as it is."""
    from jaxllm.model_loader import load_model

    make_tiny("llama", tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    assert load_model(str(tmp_path), attention_backend="pallas_gpu").model.layers.norm_scales_folded
    layers = load_model(str(tmp_path), attention_backend="reference").model.layers
    assert not layers.norm_scales_folded and layers.input_norm[...].shape == (3, 128)


def _chosen_logprobs(output) -> list[float]:
    """Log-probabilities of the prompt's tokens (after the first) and of the generated ones."""
    prompt = [next(iter(p.values())).logprob for p in output.prompt_logprobs[1:]]
    completion = output.outputs[0]
    return prompt + [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]



def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in `jaxpr` and the jaxprs nested in its equations."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_layers_share_the_step_plan(tmp_path, backend):
    """What the batch layout implies (rows' sequences and pages, rotary angles, the GPU kernel's tiles and row
    maps) is computed once per step, before the layer loop: the loop body holds no cumulative sum (row bases,
    tile table) and no sin or cos (rotary tables). On GPUs each would be a kernel launch per layer."""

    from jaxllm.model_loader import load_model

    make_tiny("llama", tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend=backend).model
    cfg = model.cfg
    rng = np.random.default_rng(0)
    _, _, _, cache, md = random_batch(rng, [3, 1], [9, 20], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16,
                                      max_seqs=3)
    cache = jnp.zeros((cfg.num_layers, *cache.shape[1:]), jnp.bfloat16)
    step = jax.make_jaxpr(lambda tokens, positions, cache, md: model(tokens, positions, cache, md))
    jaxpr = step(jnp.zeros(4, jnp.int32), jnp.arange(4), cache, md).jaxpr
    loops = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "while"]
    assert len(loops) == 1
    body = _primitives(loops[0].params["body_jaxpr"].jaxpr)
    assert "dot_general" in body  # the layers are in there
    assert not body & {"cumsum", "sin", "cos"}, body & {"cumsum", "sin", "cos"}


def test_layer_weights_enter_the_layer_loop_sliced_by_its_counter(tmp_path):
    """Every stacked layer weight enters the layer loop whole and is read only through a dynamic slice by the
    loop's own counter (the first element of its carry, stepped by one), the form in which XLA's GEMMs read a
    layer's weights in place. Slicing by some other index made XLA copy all 16 GB of an 8B model's weights
    every token on an H100 (session 3, ~9.8 ms per token); the attention kernel takes the same counter as its
    cache layer, so no other index array is sliced per layer either."""
    from flax import nnx

    from jaxllm.model_loader import load_model

    make_tiny("llama", tmp_path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = load_model(str(tmp_path), dtype="bfloat16", attention_backend="reference").model
    cfg = model.cfg
    _, _, _, cache, md = random_batch(np.random.default_rng(0), [3, 1], [9, 20], cfg.num_heads, cfg.num_kv_heads,
                                      cfg.head_dim, 16, max_seqs=3)
    cache = jnp.zeros((cfg.num_layers, *cache.shape[1:]), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda tokens, positions, cache, md: model(tokens, positions, cache, md))(
        jnp.zeros(4, jnp.int32), jnp.arange(4), cache, md).jaxpr
    (loop,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "while"]
    body = loop.params["body_jaxpr"].jaxpr
    counter = body.invars[loop.params["body_nconsts"]]
    (step,) = [eqn for eqn in body.eqns if body.outvars[0] in eqn.outvars]
    assert step.primitive.name == "add" and counter in step.invars and 1 in [getattr(v, "val", None)
                                                                               for v in step.invars]
    leaves = jax.tree.leaves(nnx.state(model.layers))
    weights = [v for v in body.invars if tuple(v.aval.shape) in {tuple(x.shape) for x in leaves}]
    assert len(weights) == len(leaves)
    for weight in weights:
        (use,) = [eqn for eqn in body.eqns if weight in eqn.invars]
        assert use.invars[1:] == [counter], use
        assert "dynamic_slice" in _primitives(use.params["jaxpr"].jaxpr)
