"""Tensor parallelism on several GPUs: greedy tokens of a random Llama-shaped float32 model with
`tensor_parallel_size` 1 and each of `--sizes` (same seed, so the same weights) must be identical.

    python benchmarks/tp_parity.py [--sizes 2 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from gpu_backend_parity import CONFIG as config  # the same model shape as the backend parity check

from jaxllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="jaxllm-tp-"))
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, config["vocab_size"], size=n).tolist()}
               for n in (5, 17, 64, 130, 300, 700, 9, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    tokens = {}
    for tp in (1, *args.sizes):
        llm = LLM(str(directory), load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=0,
                  tensor_parallel_size=tp, attention_backend="pallas_gpu", max_model_len=1024, max_num_seqs=16,
                  max_num_batched_tokens=512)
        tokens[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        gc.collect()
    for tp in args.sizes:
        same = sum(a == b for a, b in zip(tokens[1], tokens[tp]))
        print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; float32 greedy sequences "
              f"identical with tensor {tp} and tensor 1: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
