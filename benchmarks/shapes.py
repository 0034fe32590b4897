"""Model shapes the benchmarks build without weights: named LlamaConfig presets, or any config.json.

"small" is a 4-block toy for quick CPU measurements; "smollm2-135m" is SmolLM2-135M-Instruct's shape (the config lorafit's cached checkpoint carries); "llama-1b" is
Llama-3.2-1B's (16 blocks of hidden 2048, MLP 8192, 32 query / 8 KV heads, vocab 128256, tied embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

PRESETS = {
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096, "tie_word_embeddings": True},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                         "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
}


def model_config(shape: str) -> PretrainedConfig:
    """A preset's LlamaConfig, or the config of a folder / config.json path; a one-line error otherwise."""
    if shape in PRESETS:
        return LlamaConfig(**PRESETS[shape])
    path = Path(shape)
    if path.is_file() or (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    raise SystemExit(f"model shape {shape!r}: use one of {', '.join(PRESETS)} or a folder holding config.json")


def build_model(config: PretrainedConfig, device: torch.device | str = "meta",
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM of `config` with random weights (on the meta device by default: shapes only, no memory)."""
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
