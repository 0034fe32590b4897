"""A LoRA adapter alone as llama.cpp's adapter GGUF (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama ADAPTER).

llama.cpp applies W x + scale · B (A x) with scale = adapter.lora.alpha / r, r read from each lora_b,
and knows neither rsLoRA nor per-layer alphas. The file therefore holds alpha_gguf = s · r for the
global rank (alpha, or alpha·sqrt(r) with rsLoRA) and, for layers whose own s · r differs (rank or
alpha patterns), that ratio folded into their B. Only updates that are exactly W0 + s·B A on the
original base can be expressed: DoRA, the residual (unconverted) PiSSA form and LoftQ are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from lorafit.adapters.model import adapter_config, lora_layers
from lorafit.errors import UserError
from lorafit.export.gguf_arch import (
    gguf_architecture,
    gguf_tensor_name,
    permute_rotary_rows,
    rotary_heads,
    tensor_name_map,
)
from lorafit.export.gguf_file import GGUFExport, check_output_path, write_gguf
from lorafit.export.gguf_types import TensorChoice, choose_type

LORA_A_SUFFIX = ".lora_a"
LORA_B_SUFFIX = ".lora_b"
MERGED_HINT = "export the merged model instead (--gguf PATH --type q8_0)"


def gguf_lora_alpha(model: PreTrainedModel) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha / r equals the adapter's scale s for the global rank."""
    config = adapter_config(model)
    return float(config.scale * config.r)


def export_adapter_gguf(model: PreTrainedModel, path: str | Path) -> GGUFExport:
    """Write the model's LoRA adapter to `path` as llama.cpp's LoRA GGUF (F32 tensors; the model is not changed)."""
    path = check_output_path(path, "--gguf-adapter")
    config = adapter_config(model)
    if config is None:
        raise UserError("--gguf-adapter needs an adapter: pass --adapter DIR.")
    _refuse_inexpressible(config)
    arch = gguf_architecture(model.config)
    names = tensor_name_map(arch, model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    alpha = gguf_lora_alpha(model)
    layers = lora_layers(model)
    for module in layers:
        if module.endswith("lm_head") and tied:
            raise UserError(f"the adapter changes {module}, which this model ties to its embeddings; llama.cpp would "
                             f"ignore it: {MERGED_HINT}.")

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    def tensors() -> Iterator[tuple[str, np.ndarray, TensorChoice]]:
        for module, layer in layers.items():
            base = gguf_tensor_name(names, f"{module}.weight")
            lora_a = layer.lora_A.weight.detach().to("cpu", torch.float64)  # (r, in)
            lora_b = layer.lora_B.weight.detach().to("cpu", torch.float64)  # (out, r)
            lora_b = lora_b * (layer.scaling * layer.r / alpha)  # 1 unless this layer has its own rank / alpha
            b_rows = lora_b.numpy()
            heads = rotary_heads(arch, model.config, f"{module}.weight")
            if heads is not None:
                b_rows = permute_rotary_rows(b_rows, heads)
            for name, array in ((base + LORA_A_SUFFIX, lora_a.numpy()), (base + LORA_B_SUFFIX, b_rows)):
                yield name, array, choose_type(name, array.shape, "f32", tied)

    return write_gguf(path, arch, metadata, tensors(), 2 * len(layers), "GGUF adapter")


def _refuse_inexpressible(config) -> None:
    if config.use_dora:
        raise UserError("a DoRA adapter cannot be a llama.cpp LoRA GGUF (llama.cpp has no magnitude vector; its "
                         f"update is not B·A): {MERGED_HINT}.")
    if config.is_pissa:
        raise UserError(f"this PiSSA adapter is in residual form (init={config.init!r}): it applies to a base with its "
                         "principal components removed, not to the original base in the base GGUF; save it converted "
                         f"(save_adapter(convert_pissa=True)) or {MERGED_HINT}.")
    if config.init == "loftq":
        raise UserError("a LoftQ adapter corrects the NF4-quantised base it was initialised on, not the original "
                         f"weights in a base GGUF: {MERGED_HINT}.")
    if config.bias != "none":
        raise UserError(f"this adapter also trains biases (bias={config.bias!r}), which a llama.cpp LoRA GGUF cannot "
                         f"carry: {MERGED_HINT}.")
    if config.modules_to_save or config.trainable_token_indices:
        field = "modules_to_save" if config.modules_to_save else "trainable_token_indices"
        raise UserError(f"this adapter also trains whole modules or token rows ({field}), which a llama.cpp LoRA GGUF "
                        f"cannot carry (it holds B·A pairs only): {MERGED_HINT}.")
