"""Model shapes for random-weight benchmarks: `transformers` configs of well-known models."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

PRESETS = {
    "llama3-8b": {  # Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001},
    "qwen2.5-7b": {  # Qwen2.5-7B-Instruct
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "use_sliding_window": False, "torch_dtype": "bfloat16", "eos_token_id": 151645},
}


def random_weights_dir(spec: str) -> str:
    """A model directory holding only a config.json: a preset name, or the path of a config.json."""
    if spec in PRESETS:
        config = PRESETS[spec]
    elif Path(spec).is_file():
        config = json.loads(Path(spec).read_text())
    else:
        raise FileNotFoundError(f"--random-weights {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config.json")
    directory = Path(tempfile.mkdtemp(prefix="jaxllm-random-"))
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)
