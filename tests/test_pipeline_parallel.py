"""Pipeline parallelism on CPU virtual devices: pipeline 2, tensor 2 and pipeline 2 x tensor 2 give the greedy
tokens of one device, on every architecture (3 layers: an uneven split into 2 stages) and on SmolLM2 (30
layers: an even split), with each stage holding only its own layers and cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxllm import LLM, SamplingParams, pipeline
from jaxllm.cli import build_parser
from jaxllm.engine_config import EngineConfig
from jaxllm.model_loader import load_model
from jaxllm.parallel import make_mesh, padded_layers
from jaxllm.pipeline import microbatch_metadata, num_microbatches
from pallas_kernels import AttentionMetadata, kv_cache_shape
from pallas_kernels.reference import ragged_paged_attention
from tests.paged import PagedRunner
from tests.tiny_models import TINY, make_tiny

PROMPTS = {0: list(range(5, 30)), 1: [3, 4, 5, 6], 2: list(range(40, 52))}
STEP_TOKENS = 48  # every step padded to one size: one compile per layout
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (pipeline, tensor)
DEFAULT_MICROBATCH_ROWS = pipeline.MIN_MICROBATCH_ROWS


@pytest.fixture(autouse=True)
def small_microbatches(monkeypatch):
    """CPU-sized steps split into one micro-batch per stage (the default keeps micro-batches of 1024+ rows)."""
    monkeypatch.setattr(pipeline, "MIN_MICROBATCH_ROWS", 8)


@pytest.fixture(scope="module", params=sorted(TINY))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"pp-{request.param}")
    make_tiny(request.param, path)
    return request.param, path


def greedy(path, stages: int, tensor: int, steps: int = 5) -> tuple[dict, list]:
    """Prefill three prompts in one ragged step, then decode greedily; the tokens and each step's last logits."""
    mesh = make_mesh(tensor_parallel_size=tensor, pipeline_parallel_size=stages)
    runner = PagedRunner(load_model(str(path), mesh=mesh).model, page_size=8, mesh=mesh)
    feeds, tokens, logits = dict(PROMPTS), {seq: [] for seq in PROMPTS}, []
    for _ in range(steps):
        out = runner.step(feeds, pad_tokens=STEP_TOKENS - sum(map(len, feeds.values())))
        logits.append({seq: rows[-1] for seq, rows in out.items()})
        feeds = {seq: [int(rows[-1].argmax())] for seq, rows in out.items()}
        for seq, feed in feeds.items():
            tokens[seq] += feed
    return tokens, logits


def test_layouts_give_the_single_device_greedy_tokens(checkpoint, monkeypatch):
    name, path = checkpoint
    base_tokens, base_logits = greedy(path, 1, 1)
    layouts = [(p, t, 8) for p, t in LAYOUTS]  # 2 micro-batches of 24 rows
    if name == "llama":  # 4 stages of 3 layers (one all identity) in 4 micro-batches; 2 stages, 1 micro-batch
        layouts += [(4, 1, 8), (2, 1, DEFAULT_MICROBATCH_ROWS)]
    for stages, tensor, rows in layouts:
        monkeypatch.setattr(pipeline, "MIN_MICROBATCH_ROWS", rows)
        tokens, logits = greedy(path, stages, tensor)
        label = f"{name} pipeline={stages} tensor={tensor} microbatch rows>={rows}"
        assert tokens == base_tokens, label
        for step, base in zip(logits, base_logits):
            for seq in base:
                np.testing.assert_allclose(step[seq], base[seq], rtol=1e-5, atol=1e-5, err_msg=label)


def test_stages_hold_only_their_layers(tmp_path):
    """3 layers over 2 stages, each split over tensor 2: a zero (identity) 4th layer, 2 layers per device,
    read from a Hugging Face directory or restored from a converted one; the step passes activations
    between stages and never gathers weights."""
    from conversion import convert

    make_tiny("llama", tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "converted"), "auto", False)
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2)
    model = load_model(str(tmp_path / "hf"), mesh=mesh).model
    qkv_proj = model.layers.attn.qkv_proj[...]
    assert qkv_proj.shape == (4, 64, 2, 4, 16)
    assert qkv_proj.sharding.spec == PartitionSpec("pipeline", None, "tensor", None, None)
    assert {s.data.shape for s in qkv_proj.addressable_shards} == {(2, 64, 1, 4, 16)}
    for stage, devices in enumerate(mesh.devices[0]):
        held = {s.index[0] for s in qkv_proj.addressable_shards if s.device in devices}
        assert held == {slice(2 * stage, 2 * stage + 2)}
    assert not np.asarray(model.layers.mlp.down_proj[...])[3].any()
    assert not np.asarray(model.layers.input_norm[...])[3].any()
    restored = load_model(str(tmp_path / "converted"), mesh=mesh).model
    for ours, theirs in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(model))):
        assert ours.sharding == theirs.sharding
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    runner = PagedRunner(model, page_size=8, mesh=mesh)
    assert {s.data.shape[:1] + s.data.shape[3:4] for s in runner.kv_cache.addressable_shards} == {(2, 2)}
    md = AttentionMetadata(jnp.zeros(9, jnp.int32), jnp.zeros(8, jnp.int32), jnp.zeros((8, 16), jnp.int32),
                           jnp.zeros(1, jnp.int32))
    zeros = jnp.zeros(16, jnp.int32)
    hlo = runner._step.lower(runner.state, runner.kv_cache, zeros, zeros, md).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


def test_bfloat16_stages(tmp_path):
    """A bfloat16 model in 2 stages compiles (XLA's CPU compiler rejects a bfloat16 all-reduce of the stages'
    outputs) and stays within bfloat16 rounding of one device."""
    make_tiny("qwen3", tmp_path)
    out = {}
    for stages in (1, 2):
        mesh = make_mesh(pipeline_parallel_size=stages)
        runner = PagedRunner(load_model(str(tmp_path), dtype="bfloat16", mesh=mesh).model, page_size=8, mesh=mesh)
        out[stages] = runner.step(dict(PROMPTS), pad_tokens=4)
    for seq in PROMPTS:
        np.testing.assert_allclose(out[2][seq], out[1][seq], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_microbatches_attend_as_the_whole_batch(count):
    """Sequences cut across micro-batches (chunked-prefill style) get the same attention and cache writes,
    micro-batch after micro-batch, as the whole ragged batch in one call; padding rows touch nothing."""
    rng = np.random.default_rng(0)
    q_lens, contexts, page, heads, kv_heads, dim = [7, 1, 12, 1, 3], [0, 9, 4, 20, 0], 4, 4, 2, 8
    num_tokens, pages_per_seq, max_seqs = 30, 8, 8  # 24 real rows, 6 padding
    cache = jnp.asarray(rng.normal(size=kv_cache_shape(2, 64, page, kv_heads, dim)), jnp.float32)
    table = rng.permutation(64)[:max_seqs * pages_per_seq].reshape(max_seqs, pages_per_seq)
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    kv = np.zeros(max_seqs, np.int32)
    kv[:len(q_lens)] = np.add(q_lens, contexts)
    md = AttentionMetadata(jnp.asarray(cu), jnp.asarray(kv), jnp.asarray(table, jnp.int32),
                           jnp.asarray([len(q_lens)], jnp.int32))
    q = jnp.asarray(rng.normal(size=(num_tokens, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(num_tokens, kv_heads, dim)), jnp.float32) for _ in range(2))
    attend = jax.jit(lambda q, k, v, cache, md: ragged_paged_attention(q, k, v, cache, md, 1, sm_scale=0.3))
    whole, whole_cache = attend(q, k, v, cache, md)

    rows = -(-num_tokens // count)
    pad = ((0, count * rows - num_tokens), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad).reshape(count, rows, *a.shape[1:]) for a in (q, k, v))
    mds = microbatch_metadata(md, count, rows)
    outs = []
    for m in range(count):
        out, cache = attend(q[m], k[m], v[m], cache, jax.tree.map(lambda a: a[m], mds))
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs)[:cu[len(q_lens)]], whole[:cu[len(q_lens)]], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(whole_cache))


def test_smollm2_pipeline_and_tensor_parallel_match_one_device(smollm2_llm, tmp_path_factory):
    """30 layers in 2 stages of 15, each over tensor 2, through the whole engine (chunked prefill in 16-token
    steps): the greedy tokens of the single-device engine."""
    llm = LLM(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks_override=64,
              pipeline_parallel_size=2, tensor_parallel_size=2,
              compilation_cache_dir=str(tmp_path_factory.mktemp("xla-pp")))
    qkv_proj = llm.llm_engine.runner.params["layers"]["attn"]["qkv_proj"][...]
    assert {s.data.shape[0] for s in qkv_proj.addressable_shards} == {15}
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Name three colours."}]]
    params = SamplingParams(temperature=0, max_tokens=10)
    ours = llm.chat(conversations, params, use_tqdm=False)
    theirs = smollm2_llm.chat(conversations, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]
    assert "Paris" in ours[0].outputs[0].text


def test_pipeline_parallel_size_flag_and_config():
    parser = build_parser()
    for command in (["serve", "m"], ["generate", "hi"], ["chat"]):
        assert parser.parse_args([*command, "--pipeline-parallel-size", "4"]).pipeline_parallel_size == 4
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig(pipeline_parallel_size=0)
    assert (padded_layers(30, 4), padded_layers(3, 2), padded_layers(32, 1)) == (32, 4, 32)


def test_microbatch_counts(monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_MICROBATCH_ROWS", DEFAULT_MICROBATCH_ROWS)
    counts = [num_microbatches(tokens, stages) for tokens, stages in [(256, 2), (2048, 2), (2048, 4), (8192, 4)]]
    assert counts == [1, 2, 2, 4]


def test_fp8_kv_cache_under_pipeline_and_tensor_parallelism(tmp_path):
    """An 8-bit cache (bytes) sharded by stage and KV head gives one device's greedy tokens and log-probabilities."""
    make_tiny("llama", tmp_path / "model")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}]
    results = []
    for stages, tensor in ((1, 1), (2, 2)):
        llm = LLM(str(tmp_path / "model"), skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                  num_gpu_blocks_override=16, kv_cache_dtype="fp8", tensor_parallel_size=tensor,
                  pipeline_parallel_size=stages, compilation_cache_dir=str(tmp_path / "xla"))
        cache = llm.llm_engine.runner.kv_cache
        assert cache.dtype == jnp.uint8
        heads = PartitionSpec("pipeline", None, None, "tensor", None)
        assert cache.sharding.spec == (PartitionSpec(*[None] * 5) if stages == 1 else heads)
        results.append([(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                                   o.outputs[0].logprobs)])
                        for o in llm.generate(prompts, params, use_tqdm=False)])
    for (tokens, logprobs), (base_tokens, base_logprobs) in zip(results[1], results[0]):
        assert tokens == base_tokens
        np.testing.assert_allclose(logprobs, base_logprobs, rtol=1e-5, atol=1e-5)
