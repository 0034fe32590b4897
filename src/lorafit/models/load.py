"""load_model: a Hugging Face folder or id, a GGUF file, or a short name such as "smollm2-135m"."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorafit.device import default_device
from lorafit.fileio import atomic_directory
from lorafit.models.zoo import KNOWN_MODELS, fetch_gguf, model_cache_dir

FLOAT_CHECKPOINT = "float"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which forms of name_or_path are accepted."""


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). Short names (see KNOWN_MODELS) are fetched once and cached as a float checkpoint."""
    device = torch.device(device) if device is not None else default_device()
    if name_or_path in KNOWN_MODELS:
        folder, gguf_file = _known_model_folder(name_or_path), None
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist.")
        folder, gguf_file = path.parent, path.name
    else:
        folder, gguf_file = Path(name_or_path), None
    model, tokenizer = _from_pretrained(str(folder) if gguf_file or folder.exists() else str(name_or_path), gguf_file, dtype)
    model.to(device)
    model.eval()
    return model, tokenizer


def _from_pretrained(source: str, gguf_file: str | None, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        known = ", ".join(KNOWN_MODELS)
        raise ModelLoadError(
            f"could not load {source!r}: {err}\nPass a short name ({known}), a local folder written by "
            "save_pretrained, a .gguf file, or a Hugging Face id (needs network access to the hub)."
        ) from err
    if gguf_file:
        _clear_gguf_quantizer_marker(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _clear_gguf_quantizer_marker(model: PreTrainedModel) -> None:
    """GGUF loading dequantises to float but marks the model as quantised, which blocks save and training."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _known_model_folder(name: str) -> Path:
    """The cached float checkpoint of a known model, made from its GGUF on first use (later loads take <1 s)."""
    folder = model_cache_dir(name) / FLOAT_CHECKPOINT
    if (folder / "config.json").is_file():
        return folder
    gguf = fetch_gguf(name)
    start = time.perf_counter()
    model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name, torch.float32)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"lorafit: converted {gguf.name} to a float checkpoint in {time.perf_counter() - start:.1f}s ({folder})")
    return folder
