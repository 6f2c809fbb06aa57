"""Multi-step decode (`num_scheduler_steps`) and the device-resident penalty state, on a tiny random Llama:
the same tokens as single steps (greedy, seeded, penalties, stops, preemption), parity with transformers
for penalties, fewer host round trips, streaming and abort, no compilation after warm-up, no leaked pages."""

import asyncio

import jax
import numpy as np
import pytest
import torch

from jaxllm import LLM, SamplingParams
from jaxllm.async_engine import AsyncEngine
from jaxllm.runner import StepKey
from jaxllm.sampling import SamplerKind
from tests.engine_fixtures import assert_idle, compilations
from tests.tiny_models import make_tiny

VOCAB = 160


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    return path, make_tiny("llama", path)


def engine(tiny, tmp_path_factory, steps, **kwargs):
    return LLM(str(tiny[0]), max_model_len=512, skip_tokenizer_init=True, num_scheduler_steps=steps,
               compilation_cache_dir=str(tmp_path_factory.mktemp("xla")), **kwargs)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    return engine(tiny, tmp_path_factory, 1)


@pytest.fixture(scope="module")
def multi(tiny, tmp_path_factory):
    return engine(tiny, tmp_path_factory, 4)


@pytest.fixture(scope="module")
def synchronous(tiny, tmp_path_factory):
    return engine(tiny, tmp_path_factory, 4, async_scheduling=False)


def prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(0, VOCAB, 3 + 17 * i).tolist()} for i in range(count)]


MIXED = [
    SamplingParams(temperature=0, max_tokens=21, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3,
                   max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=1, min_tokens=5, stop_token_ids=list(range(3, 40)), max_tokens=40),
    SamplingParams(temperature=0, max_tokens=9, logprobs=3, ignore_eos=True),
    SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
]


def run(llm, params, seed=0, inputs=None):
    """Generate with `params` (one request each, on `inputs` or random prompts), counting engine steps;
    returns (outputs, steps)."""
    engine, steps = llm.llm_engine, 0
    for i, (prompt, p) in enumerate(zip(inputs or prompts(len(params), seed), params)):
        engine.add_request(str(i), prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        steps += 1
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(params))], steps


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_multistep_tokens_equal_single_step_in_fewer_steps(single, multi):
    one, one_steps = run(single, MIXED)
    four, four_steps = run(multi, MIXED)
    assert tokens(four) == tokens(one)
    assert [len(t[0]) for t in tokens(one)][:3] == [21, 17, 30]
    assert one[3].outputs[0].finish_reason == "stop" and len(one[3].outputs[0].token_ids) < 40
    assert four[4].outputs[0].cumulative_logprob == pytest.approx(one[4].outputs[0].cumulative_logprob, abs=1e-4)
    assert [len(s) for s in four[4].outputs[0].logprobs] == [len(s) for s in one[4].outputs[0].logprobs]
    assert four_steps < one_steps / 2
    assert_idle(single.llm_engine, wait_s=0)
    assert_idle(multi.llm_engine, wait_s=0)


def test_async_scheduling_gives_the_tokens_of_synchronous_steps(multi, synchronous):
    """Dispatching step N+1 before step N's tokens are back (pending tokens read on the device, rows of
    requests that stopped dropped) changes nothing a request sees: seeded and greedy tokens, stops,
    penalties, logprobs and parallel samples are those of one-step-at-a-time scheduling."""
    ahead, _ = run(multi, MIXED, seed=3)
    behind, _ = run(synchronous, MIXED, seed=3)
    assert tokens(ahead) == tokens(behind)
    assert [o.outputs[0].finish_reason for o in ahead] == [o.outputs[0].finish_reason for o in behind]
    assert ahead[4].outputs[0].cumulative_logprob == pytest.approx(behind[4].outputs[0].cumulative_logprob, abs=1e-5)
    assert_idle(multi.llm_engine, wait_s=0)
    assert_idle(synchronous.llm_engine, wait_s=0)


PLAIN = [SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
         SamplingParams(temperature=1.0, seed=3, max_tokens=11, ignore_eos=True, repetition_penalty=1.2),
         SamplingParams(temperature=0.7, seed=4, min_tokens=4, stop_token_ids=list(range(3, 30)), max_tokens=15)]


@pytest.mark.parametrize("extra", [
    None, SamplingParams(temperature=1.0, top_k=5, seed=2, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=1.0, min_p=0.2, seed=6, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.5, seed=7, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0, logprobs=2, max_tokens=16, ignore_eos=True)])
def test_only_decode_batches_that_neither_filter_nor_want_logprobs_run_the_plain_program(single, multi, monkeypatch,
                                                                                         extra):
    """A multi-step decode batch in which no request uses top-k, top-p, min-p or logprobs runs the program
    compiled without them; one request that filters puts its whole batch on a filter program (the one without
    top-k's search unless it uses top-k), one that wants logprobs on the full one (it outlasts the others
    here): they filter every row without run-time `cond`s, the full one ranks them too. Either way the tokens
    are those of single steps, which decide at run time."""
    runner, kinds = multi.llm_engine.runner, []
    original = runner._run
    monkeypatch.setattr(runner, "_run", lambda m: (kinds.append(m.sampler) if m.num_steps > 1 else None,
                                                   original(m))[1])
    params = PLAIN + ([extra] if extra else [])
    out, _ = run(multi, params)
    expected, _ = run(single, params)
    assert tokens(out) == tokens(expected)
    expected_kind = (SamplerKind.PLAIN if extra is None else SamplerKind.FULL if extra.logprobs
                     else SamplerKind.FILTER if extra.top_k else SamplerKind.TOP_P)
    assert kinds and set(kinds) == {expected_kind}
    if extra is not None and extra.logprobs:
        assert [len(p) for p in out[-1].outputs[0].logprobs] == [2] * 16  # the top 2 (greedy: the token among them)
        assert out[-1].outputs[0].logprobs == expected[-1].outputs[0].logprobs


GPU_SINGLE_STEPS = (SamplerKind.RUN_TIME, SamplerKind.PLAIN, SamplerKind.TOP_P)
SHORT = dict(max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("extra,kinds_seen", [
    (None, {SamplerKind.PLAIN}),
    (SamplingParams(temperature=0.8, top_p=0.5, seed=7, **SHORT), {SamplerKind.TOP_P, SamplerKind.PLAIN}),
    (SamplingParams(temperature=0.8, min_p=0.2, seed=7, **SHORT), {SamplerKind.TOP_P, SamplerKind.PLAIN}),
    (SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=7, **SHORT), {SamplerKind.RUN_TIME, SamplerKind.PLAIN}),
    (SamplingParams(temperature=0, logprobs=2, **SHORT), {SamplerKind.RUN_TIME, SamplerKind.PLAIN}),
    (SamplingParams(temperature=0, prompt_logprobs=1, **SHORT), {SamplerKind.RUN_TIME, SamplerKind.PLAIN})])
def test_single_steps_run_without_the_stages_they_do_not_need_where_a_cond_holds_the_host(
        single, monkeypatch, extra, kinds_seen):
    """Where the runner has plain and top-p single steps (GPUs), a single step whose batch neither filters nor
    wants logprobs runs the program without the sampler's run-time `cond`s, and one whose rows use only top-p or
    min-p the top-p filter without a `cond`; while a request uses top-k or (prompt) logprobs, its steps decide at
    run time. The tokens are those of the run-time program alone."""
    runner, kinds = single.llm_engine.runner, []
    params = PLAIN + ([extra] if extra else [])
    expected, _ = run(single, params)
    original = runner._run
    monkeypatch.setattr(runner, "single_step_samplers", GPU_SINGLE_STEPS)
    monkeypatch.setattr(runner, "_run", lambda m: (kinds.append(m.sampler), original(m))[1])
    out, _ = run(single, params)
    assert tokens(out) == tokens(expected)
    assert set(kinds) == kinds_seen
    assert_idle(single.llm_engine, wait_s=0)


def test_gpus_compile_plain_and_top_p_single_steps_for_each_bucket(single, monkeypatch):
    """On GPUs each bucket's single step is compiled plain and top-p as well as deciding at run time, at
    start-up with the rest; elsewhere the run-time program serves every batch."""
    runner = single.llm_engine.runner
    on_gpu = jax.devices()[0].platform == "gpu"
    assert runner.single_step_samplers == (GPU_SINGLE_STEPS if on_gpu else (SamplerKind.RUN_TIME,))
    buckets = single.llm_engine.config.token_buckets()
    monkeypatch.setattr(runner, "_compile", lambda key, num_pages: key)
    for kinds in ((SamplerKind.RUN_TIME,), GPU_SINGLE_STEPS):
        monkeypatch.setattr(runner, "single_step_samplers", kinds)
        monkeypatch.setattr(runner, "_executables", {})
        assert runner.compile_steps(8) == len(kinds) * len(buckets)
        assert set(runner._executables) == {StepKey(b, 1, sampler=kind) for b in buckets for kind in kinds}


@pytest.mark.parametrize("penalty,min_tokens", [(1.8, 0), (0.7, 0), (1.3, 8)])
def test_repetition_penalty_matches_transformers(tiny, single, multi, penalty, min_tokens):
    """Greedy with a repetition penalty over prompt and outputs (and EOS banned under min_tokens): the
    statistics kept on the device give transformers' tokens, in single and multi-step."""
    model, eos = tiny[1], 2
    prompt = prompts(3, seed=4)[2]["prompt_token_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, min_new_tokens=min_tokens, repetition_penalty=penalty)
    ours = SamplingParams(temperature=0, max_tokens=24, min_tokens=min_tokens, repetition_penalty=penalty)
    for llm in (single, multi):
        out = llm.generate({"prompt_token_ids": prompt}, ours, use_tqdm=False)[0].outputs[0].token_ids
        assert out == ref[0, len(prompt):].tolist()


def test_frequency_and_presence_penalties_agree_across_steps_and_batches(single, multi):
    """Output-only penalties accumulate on the device across steps; alone or batched, single or multi-step,
    the tokens are the same, and they differ from unpenalized ones."""
    penalized = SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=1.0, max_tokens=40,
                               ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = prompts(1, seed=5)
    alone = tokens(run(single, [penalized], inputs=prompt)[0])[0][0]
    batched = tokens(run(multi, [penalized, plain, penalized.clone(frequency_penalty=-1.0)], inputs=prompt * 3)[0])
    assert batched[0][0] == alone and batched[1][0] != alone
    assert len(set(alone)) > len(set(batched[1][0]))  # the penalty spreads the tokens


def test_preemption_under_multistep_keeps_tokens_and_frees_pages(tiny, tmp_path_factory, single):
    params = [SamplingParams(temperature=0, max_tokens=20 + i, ignore_eos=True, presence_penalty=0.2 * (i % 2))
              for i in range(8)]
    expected = tokens(run(single, params)[0])
    cramped = engine(tiny, tmp_path_factory, 4, max_num_seqs=8, num_gpu_blocks_override=12)
    got = tokens(run(cramped, params)[0])
    assert cramped.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
    assert_idle(cramped.llm_engine, wait_s=0)


def test_multistep_does_not_compile_after_warmup(multi):
    with compilations() as compiles:
        run(multi, MIXED, seed=1)
        run(multi, [SamplingParams(temperature=0.5, max_tokens=1 + i, ignore_eos=True) for i in range(16)], seed=2)
    assert compiles == []


def test_abort_during_multistep_frees_every_page(multi):
    engine = multi.llm_engine
    for i, prompt in enumerate(prompts(4, seed=3)):
        engine.add_request(f"abort-{i}", prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert all(len(r.output_token_ids) > 1 for r in engine.scheduler.running)
    outputs = engine.abort_request([f"abort-{i}" for i in range(4)])
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outputs)
    assert_idle(engine, wait_s=0)


def test_streaming_multistep_deltas_add_up_and_breaking_off_aborts(multi):
    """Through `AsyncEngine` (the server's engine): the deltas of a multi-step stream add up to the offline
    tokens, and leaving a stream early frees its pages."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = prompts(1, seed=6)[0]
    expected = multi.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    async_engine = AsyncEngine(multi.llm_engine)

    async def stream(request_id, limit=None):
        got, deltas = [], 0
        async for output in async_engine.generate(prompt, params, request_id):
            got += output.outputs[0].token_ids
            deltas += 1
            if limit is not None and len(got) >= limit:
                break
        return got, deltas

    try:
        streamed, deltas = asyncio.run(stream("s"))
        broken, _ = asyncio.run(stream("t", limit=5))
    finally:
        async_engine.shutdown()
    assert streamed == expected and 1 < deltas < len(expected)
    assert broken == expected[:len(broken)] and len(broken) < len(expected)
    assert_idle(multi.llm_engine)
