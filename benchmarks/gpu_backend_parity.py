"""End to end on a GPU: the engine with `attention_backend="pallas_gpu"` against `"reference"` on a random
Llama-shaped model (same seed, so the same weights), in float32 (greedy tokens must be identical) and
bfloat16 (the logprobs of the tokens both picked must agree within bfloat16 tolerance).

    python benchmarks/gpu_backend_parity.py [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxllm import LLM, SamplingParams

CONFIG = {  # Llama-3 heads (32 query, 8 KV, dim 128) at a quarter of the depth and width
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "tie_word_embeddings": False, "initializer_range": 0.02,
}


def run(model_dir: str, backend: str, prompts: list[list[int]], dtype: str):
    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, seed=0,
              attention_backend=backend, max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    result = [(list(o.outputs[0].token_ids),
               [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]
    del llm
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    dtype = parser.parse_args().dtype
    directory = Path(tempfile.mkdtemp(prefix="jaxllm-parity-"))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG["vocab_size"], size=n).tolist() for n in (5, 17, 64, 130, 300, 700, 9, 33)]
    ref = run(str(directory), "reference", prompts, dtype)
    ker = run(str(directory), "pallas_gpu", prompts, dtype)
    same, first_diff, lp_err = 0, [], []
    for (t_ref, lp_ref), (t_ker, lp_ker) in zip(ref, ker):
        same += t_ref == t_ker
        n = next((i for i, (a, b) in enumerate(zip(t_ref, t_ker)) if a != b), len(t_ref))
        first_diff.append(n)
        lp_err.append(float(np.max(np.abs(np.asarray(lp_ref[:n]) - np.asarray(lp_ker[:n])))) if n else 0.0)
    print(f"device: {jax.devices()[0].device_kind}; dtype {dtype}")
    print(f"greedy sequences identical: {same}/{len(prompts)}; first differing token per prompt: {first_diff}")
    print(f"max |logprob difference| over the common prefix: {max(lp_err):.4f}")


if __name__ == "__main__":
    main()
