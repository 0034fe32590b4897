"""load_model: a Hugging Face folder or id, a GGUF file, or a short name such as "smollm2-135m"; optionally in NF4."""

from __future__ import annotations

import json
import struct
import time
import warnings
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorafit.config import LorafitWarning
from lorafit.device import default_compute_dtype, default_device
from lorafit.errors import UserError
from lorafit.fileio import atomic_directory
from lorafit.models.frozen_16bit import big_frozen_weights, compute_in_model_dtype, kept_dtype
from lorafit.models.tensor_stream import SafetensorsStream
from lorafit.models.zoo import KNOWN_MODELS, fetch_gguf, model_cache_dir
from lorafit.quant import QUANT_SCHEMES, Linear4bit, QuantizationError, check_scheme, quantize_nf4

FLOAT_CHECKPOINT = "float"
SAFETENSORS_INDEX = "model.safetensors.index.json"


# What reading a model's files raises when they are missing, truncated or not what they claim to be (a cut safetensors
# or GGUF file fails inside its parser, as SafetensorError or struct.error).
UNREADABLE = (OSError, ValueError, struct.error, SafetensorError)


class ModelLoadError(UserError):
    """A model could not be loaded; the message says which forms of name_or_path are accepted."""


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). Short names (see KNOWN_MODELS) are fetched once and cached as a float checkpoint.

    quantize="nf4" turns every nn.Linear inside the transformer blocks into a frozen Linear4bit
    (never the embeddings or the output head); compute_dtype defaults to bf16 on GPUs that have it,
    else fp32. From a folder of safetensors (short names included) the model is built on the meta
    device and each weight is quantised as it is read, so the full-precision model never exists in
    memory. A GGUF file or a hub id is loaded whole in `dtype` first, then quantised layer by layer.
    """
    device = torch.device(device) if device is not None else default_device()
    if quantize is not None:
        try:
            check_scheme(quantize)
        except QuantizationError as err:
            raise ModelLoadError(f"quantize={quantize!r} is not supported: use None or one of: {', '.join(QUANT_SCHEMES)}.") from err
    if name_or_path in KNOWN_MODELS:
        folder, gguf_file = _known_model_folder(name_or_path), None
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist.")
        folder, gguf_file = path.parent, path.name
    else:
        folder, gguf_file = Path(name_or_path), None
    source = str(folder) if gguf_file or folder.exists() else str(name_or_path)
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(device)
    shards = _safetensors_shards(folder) if quantize and not gguf_file and folder.is_dir() else {}
    model = _load_nf4_streamed(source, shards, dtype, device, double_quant, compute_dtype) if shards else None
    if model is not None:
        tokenizer = _load_tokenizer(source)
    else:
        model, tokenizer = _from_pretrained(source, gguf_file, dtype)
        if quantize:
            quantize_block_linears(model, double_quant=double_quant, compute_dtype=compute_dtype, device=device)
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_error(source: str, err: Exception) -> ModelLoadError:
    known = ", ".join(KNOWN_MODELS)
    return ModelLoadError(
        f"could not load {source!r}: {err}\nPass a short name ({known}), a local folder written by "
        "save_pretrained, a .gguf file, or a Hugging Face id (needs network access to the hub)."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model (short name, folder or hub id): for data checks that need no weights."""
    source = _known_model_folder(name_or_path) if name_or_path in KNOWN_MODELS else name_or_path
    return _load_tokenizer(str(source))


def _load_tokenizer(source: str, **kwargs) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except UNREADABLE as err:
        raise _load_error(_named(source, kwargs.get("gguf_file")), err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(source: str, gguf_file: str | None, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = _load_tokenizer(source, **kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except UNREADABLE as err:
        raise _load_error(_named(source, gguf_file), err) from err
    if gguf_file:
        _clear_gguf_quantizer_marker(model)
    return model, tokenizer


def _named(source: str, gguf_file: str | None) -> str:
    """What an error names: the GGUF file itself, else the folder or hub id."""
    return str(Path(source) / gguf_file) if gguf_file else source


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


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers inside the transformer blocks (any nn.ModuleList): the layers NF4 replaces.

    The input embeddings and the output head are never included. Meant for a base model: quantise before adapters
    are attached (lorafit.adapters.prepare.prepare_model does both in that order).
    """
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    excluded = {id(m) for m in (_call_or_none(model, "get_input_embeddings"), _call_or_none(model, "get_output_embeddings")) if m}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in excluded
            and any(name.startswith(prefix + ".") for prefix in lists)]


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    getter = getattr(model, method, None)
    return getter() if callable(getter) else None


def _require_block_linears(model: nn.Module, source: str) -> list[str]:
    names = block_linear_names(model)
    if not names:
        raise ModelLoadError(f"{source!r} has no nn.Linear layers inside its transformer blocks, so quantize='nf4' would "
                             "change nothing (GPT-2's Conv1D layers are not supported); load it with quantize=None.")
    return names


def _to_nf4(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype,
            double_quant: bool, compute_dtype: torch.dtype) -> Linear4bit:
    """A Linear4bit from one full-precision weight, cast to the model dtype and quantised on `device`."""
    q = quantize_nf4(weight.to(device, dtype), double_quant=double_quant)
    return Linear4bit(q, None if bias is None else bias.to(device, dtype, copy=True), compute_dtype)


def quantize_block_linears(model: nn.Module, *, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None, skip: Collection[str] = ()) -> list[str]:
    """Replace the block linears of a loaded base model by Linear4bit, one at a time; returns their names.

    Each layer is quantised on `device` (default: where its weight is) and its float weight is freed
    in turn, so the peak is the float model plus one layer. Layers named in `skip` stay as they are
    (LoftQ's targets, which its init quantises itself).
    """
    source = getattr(model, "name_or_path", type(model).__name__)
    if any(hasattr(module, "lora_A") for module in model.modules()):
        raise ModelLoadError(f"{source!r} already carries adapters: quantise the base model before attaching them.")
    names = [name for name in _require_block_linears(model, source) if name not in skip]
    for name in names:
        linear = model.get_submodule(name)
        target = torch.device(device) if device is not None else linear.weight.device
        model.set_submodule(name, _to_nf4(linear.weight.detach(), linear.bias, target, linear.weight.dtype,
                                          double_quant, compute_dtype))
    return names


def _safetensors_shards(folder: Path) -> dict[str, Path]:
    """checkpoint key -> safetensors file, for a folder with model.safetensors or a sharded index; {} otherwise."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return {key: folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _load_nf4_streamed(source: str, shards: dict[str, Path], dtype: torch.dtype, device: torch.device,
                       double_quant: bool, compute_dtype: torch.dtype) -> PreTrainedModel | None:
    """Build the model on the meta device, then read each tensor: block linear weights are quantised as they come.

    Returns None (after a warning) when the checkpoint's key names are not the model's own: transformers
    then has to map them, so the caller loads the whole model and quantises afterwards.
    """
    try:
        config = AutoConfig.from_pretrained(source)
    except UNREADABLE as err:
        raise _load_error(source, err) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    linears = _require_block_linears(model, source)
    quantized = [f"{name}.{kind}" for name in linears for kind in ("weight", "bias")
                 if getattr(model.get_submodule(name), kind) is not None]
    rest = [name for name, _ in [*model.named_parameters(), *_persistent_buffers(model)] if name not in quantized]
    missing = [key for key in [*rest, *quantized] if key not in shards and key not in tied]
    if missing:
        warnings.warn(f"{source!r}: the safetensors keys are not the model's own (no {missing[0]}); loading the whole "
                      "model through transformers, then quantising it.", LorafitWarning, stacklevel=3)
        return None
    big_frozen = big_frozen_weights(model)
    with SafetensorsStream(shards.values()) as stream, _progress(stream, [*quantized, *rest], source) as bar:

        def held_dtype(key: str) -> torch.dtype:
            return kept_dtype(stream.stored_dtype(key), dtype) if key in big_frozen else dtype

        def read(key: str) -> torch.Tensor:
            tensor = stream.read(key, held_dtype(key))  # floats converted as they are read
            bar.update(stream.nbytes(key))
            return tensor

        for name in linears:
            bias = read(f"{name}.bias") if model.get_submodule(name).bias is not None else None
            model.set_submodule(name, _to_nf4(read(f"{name}.weight"), bias, device, dtype, double_quant, compute_dtype))
        for key in rest:
            if key in shards:
                _assign(model, key, read(key), device, held_dtype(key))
    model.tie_weights()
    compute_in_model_dtype(model, dtype)
    _init_non_persistent_buffers(model, device)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ModelLoadError(f"{source!r}: {', '.join(still_meta[:5])} could not be loaded from the checkpoint.")
    return model


def _progress(stream: SafetensorsStream, keys: list[str], source: str) -> tqdm:
    """A progress bar over the bytes of `keys` that the checkpoint holds, showing MB/s."""
    total = sum(stream.nbytes(key) for key in keys if key in stream.keys())
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"loading {Path(source).name} in NF4",
                leave=False, mininterval=1.0)


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, buf) for name, buf in model.named_buffers() if name.rpartition(".")[2] not in
            model.get_submodule(name.rpartition(".")[0])._non_persistent_buffers_set]


def _assign(model: nn.Module, key: str, value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """Put a checkpoint tensor in place of the meta parameter or buffer `key` (floats cast to `dtype`).

    `value` is the stream's own buffer (never a view of a memory map), so it is used as is when it is already
    in place: no second copy of an embedding.
    """
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    value = value.to(device, dtype if value.is_floating_point() else None)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


def _init_non_persistent_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Recompute buffers that are not in checkpoints (rotary inv_freq) with the model's own _init_weights.

    They are filled with NaN first, so a buffer that _init_weights does not know is an error, not garbage.
    """
    owners: dict[str, nn.Module] = {}
    for name, buf in [(name, buf) for name, buf in model.named_buffers() if buf.is_meta]:
        owner_name, _, leaf = name.rpartition(".")
        if not buf.is_floating_point():
            raise ModelLoadError(f"buffer {name} ({buf.dtype}) is not in the checkpoint and cannot be rebuilt "
                                 "after meta-device construction; load with quantize=None, then call quantize_block_linears(model).")
        owners[owner_name] = owner = model.get_submodule(owner_name)
        owner._buffers[leaf] = torch.full(buf.shape, float("nan"), dtype=buf.dtype, device=device)
    for owner in owners.values():
        model._init_weights(owner)
    for owner_name, owner in owners.items():
        for leaf, buf in owner.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.isnan().any():
                raise ModelLoadError(f"buffer {owner_name}.{leaf} was not rebuilt by {type(model).__name__}._init_weights "
                                     "after meta-device construction; load with quantize=None, then call quantize_block_linears(model).")
