"""The Mosaic TPU kernel, run by JAX's TPU interpreter, against the dense reference; race detection on
small shapes; the engine gives the same tokens with it as with the reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from jaxllm import LLM, SamplingParams
from pallas_kernels import tpu
from tests.test_reference_attention import CACHE_8BIT, CASES, attend_8bit_cache, dense_attention, random_batch
from tests.tiny_models import make_tiny


def run_kernel(q_lens, ctx, h, kvh, d, page, window, cap, dtype=jnp.float32, sizes=None):
    rng = np.random.default_rng(sum(ctx) + d)
    q, k, v, cache, md = random_batch(rng, q_lens, ctx, h, kvh, d, page)
    args = [jnp.asarray(x, dtype) for x in (q, k, v, cache)]
    out, new_cache = tpu.ragged_paged_attention(*args, md, 1, sm_scale=0.7 / np.sqrt(d), sliding_window=window,
                                                soft_cap=cap, sizes=sizes)
    expected = dense_attention(*(np.asarray(a, np.float32) for a in args), md, 1, 0.7 / np.sqrt(d), window, cap)
    return np.asarray(out, np.float32), expected, sum(q_lens)


@pytest.mark.parametrize("q_lens,ctx,h,kvh,d,page,window,cap", CASES)
def test_matches_dense_attention(q_lens, ctx, h, kvh, d, page, window, cap):
    out, expected, n = run_kernel(q_lens, ctx, h, kvh, d, page, window, cap)
    np.testing.assert_allclose(out[:n], expected[:n], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out[n:], 0.0)


@pytest.mark.parametrize("d,page", [(64, 16), (128, 64), (256, 256)])
def test_bfloat16_head_dims_and_page_sizes(d, page):
    out, expected, n = run_kernel([5, 1, 1], [300, 17, 64], 8, 2, d, page, None, None, dtype=jnp.bfloat16)
    assert np.linalg.norm(out[:n] - expected[:n]) / np.linalg.norm(expected[:n]) < 1e-2


@pytest.mark.parametrize("cache_dtype", CACHE_8BIT)
def test_8bit_cache_matches_dense_attention_of_its_values(cache_dtype):
    """Under the interpreter only: Mosaic TPU's handling of 8-bit pages has not been run on a TPU."""
    out, expected, n, new_cache, ref_cache = attend_8bit_cache(tpu.ragged_paged_attention, *CASES[5],
                                                               cache_dtype=cache_dtype, q_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(new_cache, np.float32), np.asarray(ref_cache, np.float32))
    np.testing.assert_allclose(out[:n], expected[:n], rtol=2e-5, atol=2e-5)


def test_no_races_with_double_buffering():
    params = pltpu.InterpretParams(detect_races=True)
    with pltpu.force_tpu_interpret_mode(params):
        out, expected, n = run_kernel([3, 1, 6], [20, 33, 6], 4, 2, 16, 4, None, None,
                                      sizes=tpu.BlockSizes(block_q=4, block_kv_tokens=8))
    np.testing.assert_allclose(out[:n], expected[:n], rtol=2e-5, atol=2e-5)
    assert interpret_pallas_call.races is not None and not interpret_pallas_call.races.races_found


def test_backend_selection(monkeypatch):
    assert pallas_kernels.resolve_backend("pallas_tpu") == "pallas_tpu"
    assert pallas_kernels.resolve_backend("auto") == "reference"  # on CPU
    monkeypatch.setenv("JAXLLM_ATTENTION_BACKEND", "pallas_tpu")
    assert pallas_kernels.resolve_backend("auto") == "pallas_tpu"
    with pytest.raises(ValueError, match="reference"):
        pallas_kernels.resolve_backend("flash")


def test_tensor_parallel_kernel_runs_per_device_heads(tmp_path):
    """Tensor parallel 2 with a Pallas kernel (each device attends its own heads, `shard_map`) gives one
    device's tokens and logprobs (the TPU interpreter runs two devices; the GPU one cannot)."""
    make_tiny("llama", tmp_path / "model", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, vocab_size=160)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 30)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    results = {}
    for backend, tp in (("reference", 1), ("pallas_tpu", 2)):
        llm = LLM(str(tmp_path / "model"), skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=32, num_gpu_blocks_override=32, attention_backend=backend,
                  tensor_parallel_size=tp, compilation_cache_dir=str(tmp_path / "xla"))
        results[tp] = [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                                o.outputs[0].logprobs)])
                       for o in llm.generate(prompts, params, use_tqdm=False)]
    for (ref_tokens, ref_lp), (tokens, lp) in zip(results[1], results[2]):
        assert tokens == ref_tokens
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)


def test_engine_applies_attention_block_sizes(tmp_path, monkeypatch):
    """`attention_block_sizes` reaches the kernel: small blocks (several query chunks and KV blocks per
    sequence) give the reference's tokens, and a name the kernel does not have is refused by name."""
    seen = set()
    original = tpu.attend
    monkeypatch.setattr(tpu, "attend", lambda *a, **kw: seen.add(kw["sizes"]) or original(*a, **kw))
    make_tiny("llama", tmp_path / "model", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
              head_dim=64, vocab_size=160)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 30)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    common = dict(skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
                  num_gpu_blocks_override=32, compilation_cache_dir=str(tmp_path / "xla"))
    expected = [o.outputs[0].token_ids for o in LLM(str(tmp_path / "model"), **common).generate(
        prompts, params, use_tqdm=False)]
    small = LLM(str(tmp_path / "model"), attention_backend="pallas_tpu",
                attention_block_sizes={"block_q": 8, "block_kv_tokens": 16}, **common)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)] == expected
    assert seen == {tpu.BlockSizes(block_q=8, block_kv_tokens=16)}  # every traced call used the setting
    with pytest.raises(ValueError, match="block_kv .*not block sizes of pallas_tpu"):
        LLM(str(tmp_path / "model"), attention_backend="pallas_tpu", attention_block_sizes={"block_kv": 64},
            **common)
