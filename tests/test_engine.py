"""The engine end to end on SmolLM2 (CPU, float32): parity with transformers, batch invariance under
preemption and chunked prefill, seeds, logprobs, no compilation after warm-up, no leaked pages, errors."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.engine_fixtures import assert_idle, compilations, hf_greedy, hf_smollm2, start_logged, text_token_ids
from tests.tiny_models import make_tiny

CHATS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a tip for learning Python.",
]
RAW = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm


@pytest.fixture(scope="module")
def hf():
    return hf_smollm2()


def assert_all_pages_free(llm):
    assert_idle(llm.llm_engine, wait_s=0)


def test_greedy_chat_and_raw_prompts_match_transformers(llm, hf):
    eos = 2
    chats = llm.chat([[{"role": "user", "content": c}] for c in CHATS], GREEDY, use_tqdm=False)
    raws = llm.generate(RAW, GREEDY, use_tqdm=False)
    for out in chats + raws:
        expected = hf_greedy(hf, out.prompt_token_ids, 20, eos)
        assert out.outputs[0].token_ids == expected, out.prompt
    assert chats[0].outputs[0].text == "The capital of France is Paris."
    assert chats[0].outputs[0].finish_reason == "stop" and raws[0].outputs[0].finish_reason == "length"
    assert_all_pages_free(llm)


def test_prompt_logprobs_match_transformers(llm, hf):
    import torch
    out = llm.generate(RAW[2], SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=3, temperature=0),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]], abs=2e-3)
        assert len(entry) in (2, 3)
    steps = out.outputs[0].logprobs
    assert len(steps) == 3 and all(len(s) in (3, 4) for s in steps)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(s[t].logprob for s, t in zip(steps, out.outputs[0].token_ids)), abs=1e-4)


def workload(llm, count=32):
    """32 greedy requests with prompts from 1 to 600 tokens."""
    texts = text_token_ids(llm.get_tokenizer(), count)
    lengths = np.linspace(1, 600, count).astype(int)
    prompts = [{"prompt_token_ids": (t * 10)[:n]} for t, n in zip(texts, lengths)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 6, ignore_eos=True) for i in range(count)]
    return prompts, params


@pytest.mark.slow
def test_batch_invariance_with_preemption_and_chunked_prefill(llm, tmp_path):
    prompts, params = workload(llm)
    alone = [llm.generate(p, s, use_tqdm=False)[0].outputs[0].token_ids for p, s in zip(prompts, params)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone
    assert_all_pages_free(llm)
    tiny = LLM(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=48, num_gpu_blocks_override=48,
               compilation_cache_dir=str(tmp_path))
    cramped = [o.outputs[0].token_ids for o in tiny.generate(prompts, params, use_tqdm=False)]
    assert tiny.llm_engine.scheduler.num_preemptions > 0
    assert cramped == alone
    assert_all_pages_free(tiny)


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = llm.generate(RAW[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=8), SamplingParams(temperature=0.0, max_tokens=5)]
    mixed = llm.generate([RAW[1], RAW[0], RAW[2]], [others[0], params, others[1]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = llm.generate([RAW[0]] * 2, SamplingParams(temperature=1.0, max_tokens=12), use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_parallel_samples(llm):
    out = llm.generate(RAW[2], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = llm.generate(RAW[2], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_all_pages_free(llm)


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate(RAW[1], GREEDY, use_tqdm=False)[0].outputs[0]
    stop = base.text[5:9]
    cut = llm.generate(RAW[1], GREEDY.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == base.text[:base.text.index(stop)] and cut.stop_reason == stop
    kept = llm.generate(RAW[1], GREEDY.clone(stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == base.text[:base.text.index(stop) + len(stop)]
    token = base.token_ids[3]
    by_id = llm.generate(RAW[1], GREEDY.clone(stop_token_ids=[token]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == base.token_ids[:base.token_ids.index(token) + 1] and by_id.stop_reason == token


def test_min_tokens_and_ignore_eos(llm):
    question = [{"role": "user", "content": CHATS[0]}]
    short = llm.chat(question, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert short.token_ids[-1] == 2
    longer = llm.chat(question, SamplingParams(temperature=0, max_tokens=40, min_tokens=len(short.token_ids) + 3),
                      use_tqdm=False)[0].outputs[0]
    assert 2 not in longer.token_ids[:len(short.token_ids) + 2]
    forced = llm.chat(question, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
                      use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) == 15 and forced.finish_reason == "length"


def test_no_compilation_after_warmup(llm):
    with compilations() as compiles:
        llm.chat([[{"role": "user", "content": c}] for c in CHATS[:3]], GREEDY, use_tqdm=False)
        llm.generate(RAW + [{"prompt_token_ids": list(range(5, 300))}],
                     [SamplingParams(temperature=0.8, top_k=20, max_tokens=6, logprobs=2),
                      SamplingParams(n=2, temperature=1.0, presence_penalty=0.5, repetition_penalty=1.2,
                                     max_tokens=9, seed=3),
                      SamplingParams(temperature=0, stop=["\n"], min_tokens=2, max_tokens=7),
                      SamplingParams(temperature=0.5, min_p=0.1, top_p=0.8, max_tokens=3)], use_tqdm=False)
    assert compiles == []


def test_abort_frees_every_page(llm):
    engine = llm.llm_engine
    for i in range(5):
        engine.add_request(f"abort-{i}", RAW[i % 3] * 20, SamplingParams(max_tokens=50, n=1 + i % 2))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.pool.num_free < engine.scheduler.pool.num_pages
    outputs = engine.abort_request([f"abort-{i}" for i in range(5)])
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outputs)
    assert_all_pages_free(llm)


@pytest.mark.parametrize("prompt,params,message", [
    ("hi", SamplingParams(max_tokens=1024), "max_model_len"),
    ({"prompt_token_ids": [1, 99999]}, SamplingParams(), "vocabulary"),
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ("hi", SamplingParams(logprobs=50), "max_logprobs"),
])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["fine prompt", prompt], params, use_tqdm=False)
    assert_all_pages_free(llm)
    assert llm.generate(RAW[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_staging_fields_start_256_byte_aligned():
    """XLA may hand a field of the int32 staging buffer (the page table, say) to a kernel as a slice of the
    buffer, and Mosaic GPU kernels refuse inputs that are not 256-byte aligned (found on an H100)."""
    from jaxllm.runner import _Layout

    layout = _Layout.of(48, 16)
    ends = [offset + int(np.prod(shape)) for _, shape, offset in layout.fields]
    assert all(offset * 4 % 256 == 0 for _, _, offset in layout.fields)
    assert all(end <= start for end, (_, _, start) in zip(ends, layout.fields[1:]))  # no overlap
    assert ends[-1] <= layout.size


def test_the_next_step_is_dispatched_before_the_previous_one_is_fetched(llm, hf, monkeypatch):
    """The devices get step N+1 before the host waits for step N's tokens (vLLM's async scheduling), the
    request still gets exactly its greedy tokens, and no step is wasted when the output length is known."""
    runner, calls = llm.llm_engine.runner, []
    dispatch, fetch = runner.dispatch, runner.fetch
    monkeypatch.setattr(runner, "dispatch", lambda out: (calls.append("dispatch"), dispatch(out))[1])
    monkeypatch.setattr(runner, "fetch", lambda step: (calls.append("fetch"), fetch(step))[1])
    prompt, params = list(range(5, 45)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 12, None)
    fetches = [i for i, call in enumerate(calls) if call == "fetch"]
    assert calls.count("dispatch") == len(fetches) == 12  # a prefill and 11 decodes: none wasted
    assert all(calls[:at].count("dispatch") == n + 2 for n, at in enumerate(fetches[:-1]))
    assert_idle(llm.llm_engine, wait_s=0)


def test_steps_send_only_new_pages(llm, monkeypatch):
    """The page table lives on the device, a row per slot: a step sends only the pages handed out since the
    last one (else every step would send the whole `[sequences, max_model_len / page]` table, 8 MiB per step
    for 256 sequences of Llama-3.1's 131,072 tokens). Each page of a request goes once, at its first step."""
    runner, page = llm.llm_engine.runner, llm.llm_engine.config.block_size
    sent, run = [], runner._run
    monkeypatch.setattr(runner, "_run", lambda message: (sent.append(message.page_updates.copy()), run(message))[1])
    prompt, new = list(range(5, 45)), 30
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == new
    counts = [len(s) for s in sent]
    assert counts[0] == -(-len(prompt) // page)  # the prompt's pages with the prefill
    assert sum(counts) == -(-(len(prompt) + new - 1) // page)  # then one as each page fills
    assert all(c <= 1 for c in counts[1:])  # decode steps: a page at most, and most none
    assert [c for s in sent for c in s[:, 1]] == list(range(sum(counts)))  # columns in order, none twice


def test_prompt_logprobs_in_row_chunks_match_transformers(tmp_path, monkeypatch):
    """Prompt logprobs are computed a few rows at a time (bounded memory); with chunks of 16 rows a 40-token
    prompt spans three chunks plus padding, and every position still matches transformers."""
    import torch

    import jaxllm.runner
    from tests.tiny_models import make_tiny

    monkeypatch.setattr(jaxllm.runner, "PROMPT_LOGPROB_ROWS", 16)
    hf = make_tiny("llama", tmp_path / "model")
    llm = LLM(str(tmp_path / "model"), skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=64, num_gpu_blocks_override=32, compilation_cache_dir=str(tmp_path / "xla"))
    ids = np.random.default_rng(0).integers(3, 100, 40).tolist()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    entries = out[0].prompt_logprobs
    assert entries[0] is None and len(entries) == len(ids)
    for pos in range(1, len(ids)):
        assert entries[pos][ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]], abs=1e-4)
        top = max(entries[pos].values(), key=lambda lp: lp.logprob)
        assert top.rank == 1 and top.logprob == pytest.approx(ref[pos - 1].max(), abs=1e-4)


def test_start_up_logs_its_phases(tmp_path):
    """Start-up ends with one line that splits its time into loading, compiling and warm-up, and counts the
    compiled step variants (what a slow start is diagnosed from)."""
    from tests.tiny_models import make_tiny

    make_tiny("llama", tmp_path / "model")
    llm, line = start_logged(str(tmp_path / "model"), skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
                             max_num_batched_tokens=64, num_gpu_blocks_override=32,
                             compilation_cache_dir=str(tmp_path / "xla"))
    match = re.fullmatch(r"engine ready in ([\d.]+) s: model, tokenizer and cache sizing ([\d.]+) s, (\d+) step "
                         r"variants \((\d+) loaded from the step cache, (\d+) compiled\) ([\d.]+) s, KV cache and "
                         r"warm-up ([\d.]+) s", line)
    assert match, line
    total, *phases = (float(match[i]) for i in (1, 2, 6, 7))
    assert int(match[3]) == len(llm.llm_engine.runner._executables) == int(match[5])  # a new cache: all compiled
    assert int(match[4]) == 0
    assert sum(phases) == pytest.approx(total, abs=0.2)


def test_fp8_kv_cache_holds_more_pages_and_refuses_unknown_dtypes(tmp_path):
    """`kv_cache_dtype="fp8"` (vLLM's `--kv-cache-dtype`): the cache holds float8_e4m3fn values as bytes, a page
    takes a quarter of the float32 model's bytes (so the same memory holds four times the pages), and greedy
    decoding runs on it; an unknown dtype is refused by name."""
    from jaxllm.engine_config import EngineConfig

    make_tiny("llama", tmp_path / "model", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=128)
    page_bytes, tokens = {}, {}
    for dtype in ("auto", "fp8"):
        llm = LLM(str(tmp_path / "model"), skip_tokenizer_init=True, max_model_len=64, max_num_seqs=2,
                  num_gpu_blocks_override=16, kv_cache_dtype=dtype, compilation_cache_dir=str(tmp_path / "xla"))
        runner = llm.llm_engine.runner
        page_bytes[dtype] = runner.page_bytes_per_device()
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        tokens[dtype] = llm.generate([{"prompt_token_ids": list(range(3, 40))}], params, use_tqdm=False)
        assert_idle(llm.llm_engine)
    assert runner.cache_format == jnp.float8_e4m3fn and runner.kv_cache.dtype == jnp.uint8
    assert runner.kv_cache.nbytes == 16 * page_bytes["fp8"]
    assert page_bytes["auto"] == 4 * page_bytes["fp8"]
    assert len(tokens["fp8"][0].outputs[0].token_ids) == 8
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, bfloat16, fp8, fp8_e4m3, fp8_e5m2"):
        EngineConfig(kv_cache_dtype="int8")
