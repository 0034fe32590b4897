"""Which architectures export to GGUF, their llama.cpp hyper-parameter keys, tensor names and Q/K row order.

llama.cpp's convert_hf_to_gguf.py is the reference: Llama and Mistral share the `llama` architecture
(Mistral without sliding-window attention in llama.cpp), Qwen2 is `qwen2`. For `llama` the rows of
q_proj and k_proj are reordered from the Hugging Face rotary layout (halves) to llama.cpp's (pairs);
transformers' GGUF loader undoes it.
"""

from __future__ import annotations

import gguf
import numpy as np
from transformers import PretrainedConfig

from lorafit.errors import UserError

# Hugging Face model_type -> GGUF general.architecture
SUPPORTED_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED_ARCHITECTURES = ("llama",)


def gguf_architecture(config: PretrainedConfig) -> str:
    """The GGUF architecture name of a model config, or a one-line ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise UserError(f"GGUF export does not support model_type {model_type!r}; supported: {supported}.")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"GGUF export supports plain RoPE only; this {model_type} model uses rope_type={rope_type!r} "
                         "(rope scaling is not exported yet): use `lorafit merge --out DIR` instead.")
    return SUPPORTED_ARCHITECTURES[model_type]


def head_dim(config: PretrainedConfig) -> int:
    """Width of one attention head (config.head_dim when set, else hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, vocab_size: int) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the model (the ones convert_hf_to_gguf writes for these archs)."""
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    width = head_dim(config)
    writer.add_rope_dimension_count(width)
    if width * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(width)
        writer.add_value_length(width)


def tensor_name_map(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)


def gguf_tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight` (gguf-py's own table)."""
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"tensor {hf_name!r} has no GGUF name for this architecture; the model has layers that "
                         "llama.cpp would not read: use `lorafit merge --out DIR` instead.")
    return name


def rotary_heads(arch: str, config: PretrainedConfig, hf_name: str) -> int | None:
    """Heads to permute the rows of `hf_name` by (llama q_proj / k_proj weights), or None when it stays as is."""
    if arch not in _PERMUTED_ARCHITECTURES:
        return None
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return config.num_key_value_heads or config.num_attention_heads
    return None


def permute_rotary_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K reordering: in each head, row pairs (i, i + d/2) become (2i, 2i + 1). Works on any
    array whose first axis holds the output rows (a weight, a bias, or LoRA's B)."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))
