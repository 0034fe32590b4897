"""A merged model (base + adapter folded in fp32) as one GGUF file for llama.cpp / Ollama / LM Studio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorafit.adapters.model import merge_and_unload
from lorafit.export.gguf_arch import (
    add_hyperparameters,
    gguf_architecture,
    gguf_tensor_name,
    permute_rotary_rows,
    rotary_heads,
    tensor_name_map,
)
from lorafit.export.gguf_file import GGUFExport, check_output_path, write_gguf
from lorafit.export.gguf_tokenizer import add_tokenizer_from_gguf, add_tokenizer_from_hf
from lorafit.export.gguf_types import TensorChoice, check_export_type, choose_type

OUTPUT_HEAD_KEY = "lm_head.weight"


def export_model_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path,
                      export_type: str = "q8_0", *, tokenizer_gguf: str | Path | None = None,
                      name: str | None = None) -> GGUFExport:
    """Merge the model's adapter (if any; 4-bit bases are dequantised) and write it to `path` as GGUF.

    The model is modified in place (merge_and_unload). Tokenizer keys are copied from `tokenizer_gguf`
    when the model came from a GGUF file, else built from `tokenizer`. See gguf_types for which tensors
    keep a wider type than `export_type` and why.
    """
    path = check_output_path(path, "--gguf")
    _, file_type = check_export_type(export_type)
    arch = gguf_architecture(model.config)
    merged = merge_and_unload(model, dtype=torch.float32)
    config = merged.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {key: value for key, value in merged.state_dict().items() if not (tied and key == OUTPUT_HEAD_KEY)}
    vocab_size = merged.get_input_embeddings().weight.shape[0]
    names = tensor_name_map(arch, config.num_hidden_layers)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        add_hyperparameters(writer, config, vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_gguf is not None:
            add_tokenizer_from_gguf(writer, Path(tokenizer_gguf), vocab_size)
        else:
            add_tokenizer_from_hf(writer, tokenizer, vocab_size)

    def tensors() -> Iterator[tuple[str, np.ndarray, TensorChoice]]:
        for key, value in state.items():
            array = value.detach().to("cpu", torch.float32).numpy()
            heads = rotary_heads(arch, config, key)
            if heads is not None:
                array = permute_rotary_rows(array, heads)
            gguf_name = gguf_tensor_name(names, key)
            yield gguf_name, array, choose_type(gguf_name, array.shape, export_type, tied)

    return write_gguf(path, arch, metadata, tensors(), len(state), f"GGUF {export_type}")
