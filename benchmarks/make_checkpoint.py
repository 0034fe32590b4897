"""Write a random-weight checkpoint with the architecture of a real 1B-8B model, for memory and speed benchmarks.

    python benchmarks/make_checkpoint.py --shape llama-3.1-8b --out /tmp/lorafit-bench/llama-3.1-8b --seed 0

The configs below are the numbers of the public config.json files of meta-llama/Llama-3.1-8B,
meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-7B, written from memory of those files (no network here):
hidden and MLP sizes, layers, attention and key/value heads (GQA), vocabulary, rotary settings and
whether the output head is tied to the embeddings. Weights are N(0, 0.02) in bf16 (norm weights 1,
biases 0), drawn tensor by tensor from a generator seeded by (--seed, tensor index): the same seed
gives the same bytes. They are written as sharded bf16 safetensors plus model.safetensors.index.json
the way save_pretrained lays them out, ONE TENSOR AT A TIME: at most one shard's worth of tensors
(--shard-mb, default 1000 MB; a bigger single tensor gets a shard of its own) is in memory at once.

The tokenizer is SmolLM2's (49152 ids, from lorafit's model cache): the config keeps the real
vocabulary size, so the tokenizer's ids are a subset of the embedding rows and the rows above 49151
are simply never looked up. Its bos/eos ids are written into the config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lorafit.fileio import atomic_directory, write_json_atomic
from lorafit.models.load import SAFETENSORS_INDEX, load_tokenizer

INIT_STD = 0.02
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                     "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0},
                     "hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                     "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0},
                     "hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "rope_theta": 1000000.0, "hidden_act": "silu", "use_sliding_window": False,
                   "sliding_window": 131072, "max_window_layers": 28},  # Qwen2 has q/k/v biases by design
}
TOKENIZER_SOURCE = "smollm2-135m"


def make_config(shape: str, layers: int | None) -> Any:
    """The transformers config of `shape` (optionally with fewer layers), bf16, with the tokenizer's special ids."""
    values = dict(SHAPES[shape])
    if layers is not None:
        values["num_hidden_layers"] = layers
        if "max_window_layers" in values:
            values["max_window_layers"] = layers
    tokenizer = load_tokenizer(TOKENIZER_SOURCE)
    values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values), tokenizer


def tensor_specs(config: Any) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every tensor the checkpoint holds, in the model's order (a tied head is not repeated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return [(name, p.shape) for name, p in model.named_parameters()]


def random_tensor(name: str, shape: torch.Size, seed: int, index: int) -> torch.Tensor:
    """Tensor `index` of the checkpoint: ones for norm weights, zeros for biases, else N(0, INIT_STD) in bf16."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)


def write_checkpoint(shape: str, out: Path, seed: int, layers: int | None = None, shard_mb: int = 1000) -> Path:
    """Write config, tokenizer, shards and index to `out` (atomically: a crash leaves no half folder)."""
    config, tokenizer = make_config(shape, layers)
    specs = tensor_specs(config)
    limit = shard_mb * 1_000_000
    groups: list[list[int]] = [[]]
    size = 0
    for index, (_, dims) in enumerate(specs):
        nbytes = 2 * dims.numel()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += nbytes
    weight_map, total = {}, 0
    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for number, group in enumerate(groups, start=1):
            file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            shard = {specs[i][0]: random_tensor(*specs[i], seed, i) for i in group}
            save_file(shard, tmp / file, metadata={"format": "pt"})
            _fsync(tmp / file)
            total += sum(t.numel() * 2 for t in shard.values())
            weight_map.update(dict.fromkeys(shard, file))
            del shard
            print(f"  {file}: {len(group)} tensors", flush=True)
        write_json_atomic(tmp / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    parameters = sum(dims.numel() for _, dims in specs)
    print(f"wrote {shape} ({parameters / 1e9:.2f}B parameters, {total / 1e9:.2f} GB bf16, {len(groups)} shards) to {out}")
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="fewer transformer blocks than the real model")
    parser.add_argument("--shard-mb", type=int, default=1000, help="shard size in MB (1e6 bytes)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers <= 0:
        parser.error(f"--layers {args.layers}: use a positive number of blocks")
    write_checkpoint(args.shape, args.out, args.seed, args.layers, args.shard_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
