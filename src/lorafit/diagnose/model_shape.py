"""A model's shape (sizes, layer count, heads, vocabulary) read from config.json or a GGUF header, no weights loaded.

The memory estimator and the recommender need only these numbers; reading them takes milliseconds for a
config.json (a GGUF header with its tokenizer arrays takes a few seconds) and never touches tensor data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import ConfigError
from lorafit.models.zoo import KNOWN_MODELS, model_cache_dir

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
BLOCK_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
GGUF_FIELDS = {  # ModelShape field -> GGUF key suffix after "<architecture>."
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_layers": "block_count",
    "num_heads": "attention.head_count",
}


class ModelShapeError(ConfigError):
    """A model's shape could not be read; the message names the file or field and what to pass instead."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder (Llama, Mistral, Qwen2): enough to count parameters and activations."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) add biases to q/k/v
    o_bias: bool = False
    mlp_bias: bool = False
    checkpoint_dtype: str | None = None  # config.json's dtype ("bfloat16", ...): what the safetensors hold; None: unknown

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of each linear layer of one block, by module name."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {
            "q_proj": (h, q, self.qkv_bias), "k_proj": (h, kv, self.qkv_bias), "v_proj": (h, kv, self.qkv_bias),
            "o_proj": (q, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias), "down_proj": (i, h, self.mlp_bias),
        }

    def parameter_tensors(self) -> list[tuple[str, int]]:
        """(kind, numel) of every parameter tensor; kind is 'embedding', 'head', 'linear', 'bias' or 'norm'."""
        tensors = [("embedding", self.vocab_size * self.hidden_size)]
        for _ in range(self.num_layers):
            for fan_in, fan_out, bias in self.linear_shapes().values():
                tensors.append(("linear", fan_in * fan_out))
                if bias:
                    tensors.append(("bias", fan_out))
            tensors += [("norm", self.hidden_size)] * 2
        tensors.append(("norm", self.hidden_size))
        if not self.tie_word_embeddings:
            tensors.append(("head", self.vocab_size * self.hidden_size))
        return tensors

    def parameter_count(self) -> int:
        """Number of distinct parameters (a tied output head shares the embedding matrix)."""
        return sum(n for _, n in self.parameter_tensors())


# Llama-3-8B's published config (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 kv heads, vocab 128256, bf16).
LLAMA_3_8B = ModelShape(name="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                        checkpoint_dtype="bfloat16")


def model_shape(name_or_path: str | Path) -> ModelShape:
    """Shape of a known short name (its cached config.json or GGUF), a config.json / its folder, or a .gguf file."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        return _known_model_shape(text)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelShapeError(f"GGUF file {str(path)!r} does not exist.")
        return shape_from_gguf(path)
    if path.is_file():
        return shape_from_config(path)
    known = ", ".join(KNOWN_MODELS)
    raise ModelShapeError(
        f"cannot read the shape of {text!r}: pass a short name ({known}), a folder holding config.json, "
        "a config.json file or a .gguf file (hub ids are not fetched: download the config.json first)."
    )


def shape_from_config(path: str | Path) -> ModelShape:
    """Shape from a Hugging Face config.json of a Llama-family model; errors name the file and the missing field."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelShapeError(f"{path}: not a readable JSON config ({err}).") from err
    missing = [key for key in CONFIG_FIELDS if not isinstance(config.get(key), int)]
    if missing:
        raise ModelShapeError(
            f"{path}: missing integer field(s) {', '.join(missing)} (model_type {config.get('model_type')!r}); "
            "the estimator knows Llama-family configs (llama, mistral, qwen2) with these fields."
        )
    heads = config["num_attention_heads"]
    qkv_bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))  # Qwen2 has q/k/v biases
    return ModelShape(
        name=str(config.get("_name_or_path") or config.get("_model_name_or_path") or path.parent.name),
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        qkv_bias=qkv_bias,
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
    )


def shape_from_gguf(path: str | Path) -> ModelShape:
    """Shape from a GGUF file's metadata and tensor names (gguf.GGUFReader; tensor data stays memory-mapped, unread)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as err:
        raise ModelShapeError(f"{path}: not a readable GGUF file ({err}).") from err
    arch = _gguf_value(reader, "general.architecture", path)
    values = {field: _gguf_value(reader, f"{arch}.{key}", path) for field, key in GGUF_FIELDS.items()}
    tensor_names = {tensor.name for tensor in reader.tensors}
    vocab = reader.fields.get(f"{arch}.vocab_size")
    vocab_size = vocab.contents() if vocab is not None else len(_gguf_value(reader, "tokenizer.ggml.tokens", path))
    kv_heads = reader.fields.get(f"{arch}.attention.head_count_kv")
    head_dim = reader.fields.get(f"{arch}.rope.dimension_count")
    return ModelShape(
        name=str(reader.fields["general.name"].contents()) if "general.name" in reader.fields else path.stem,
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_layers=values["num_layers"],
        num_heads=values["num_heads"],
        num_kv_heads=kv_heads.contents() if kv_heads is not None else values["num_heads"],
        head_dim=head_dim.contents() if head_dim is not None else values["hidden_size"] // values["num_heads"],
        vocab_size=vocab_size,
        tie_word_embeddings="output.weight" not in tensor_names,  # llama.cpp writes no output tensor when tied
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
    )


def _gguf_value(reader: Any, key: str, path: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ModelShapeError(f"{path}: GGUF metadata has no {key!r}; the estimator needs a Llama-family GGUF.")
    return field.contents()


def _known_model_shape(name: str) -> ModelShape:
    """A known model's cached float config.json, else its cached GGUF; never downloads."""
    folder = model_cache_dir(name)
    config = folder / "float" / "config.json"
    gguf = folder / KNOWN_MODELS[name].file_name
    if config.is_file():
        return dataclasses.replace(shape_from_config(config), name=name)
    if gguf.is_file():
        return dataclasses.replace(shape_from_gguf(gguf), name=name)
    raise ModelShapeError(
        f"{name!r} is not in lorafit's cache ({folder}): load it once (e.g. `lorafit train` or "
        f"lorafit.load_model({name!r})) or pass a config.json or .gguf path."
    )
