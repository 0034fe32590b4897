"""Save / load adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module>.lora_A.weight` etc., exactly what PEFT writes, so an adapter
saved here loads with `peft.PeftModel.from_pretrained` and one saved by PEFT loads here. Modules of
modules_to_save are saved as `base_model.model.<module>.<param>` (their trained copy), trained token rows as
`base_model.model.<module>.token_adapter.trainable_tokens_delta`; `saved_keys` is the one map from saved keys
to the model's parameter names. A run that added tokens saves its tokenizer in the folder too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lorafit.adapters.init import initial_factors
from lorafit.adapters.model import TARGETS_ATTR, adapter_config, attach, lora_layers
from lorafit.adapters.modules_to_save import COPY_ATTR, modules_to_save, present_entries
from lorafit.adapters.targets import minimal_suffixes
from lorafit.adapters.trainable_tokens import DELTA, SAVED_DELTA, token_layers
from lorafit.config import AdapterConfig, ConfigError
from lorafit.errors import UserError
from lorafit.fileio import atomic_directory, write_json_atomic, write_safetensors
from lorafit.models.vocabulary import resize_vocabulary

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
TOKENIZER_CONFIG = "tokenizer_config.json"

# PEFT fields we cannot honour yet: loading an adapter that relies on them would silently give other outputs.
_UNSUPPORTED_WHEN_SET = {
    "layers_to_transform": "layer selection by index",
    "lora_bias": "a bias on lora_B",
    "ensure_weight_tying": "one shared trained copy of tied embeddings and head (lorafit trains separate copies, "
                           "PEFT's default)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
}


class AdapterFileError(UserError):
    """An adapter folder is missing, incomplete, corrupt or does not fit the model."""


def save_adapter(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None,
                 convert_pissa: bool = True, parameters: Mapping[str, torch.Tensor] | None = None,
                 tokenizer: Any = None) -> Path:
    """Write the adapter of `model` to folder `path` atomically, in PEFT's layout.

    A PiSSA adapter is by default converted to a plain LoRA adapter of rank 2r that applies to the original,
    unmodified base (PEFT's conversion). convert_pissa=False keeps the residual form: A and B as trained with
    init 'pissa' in the config, so loading (lorafit or PEFT) re-runs the SVD on the original base to rebuild the
    residual first; exact for 'pissa', while 'pissa_niter_K' depends on the randomised SVD's seed (lorafit seeds
    it, PEFT does not), so share converted adapters. `parameters` (parameter name -> full tensor) replaces the
    model's own tensors: lorafit.distributed passes the adapter gathered from every rank's shards. `tokenizer`
    (a run that added tokens) is saved in the folder too, so the resized vocabulary travels with the adapter.
    """
    config = adapter_config(model)
    if config is None:
        raise ConfigError("this model has no lorafit adapter to save: call lorafit.attach(model, config) first.")
    tensors = adapter_state_dict(model, parameters)
    peft_config = to_peft_config(config, model, base_model_name_or_path)
    if config.is_pissa and convert_pissa:
        tensors, peft_config = pissa_as_lora(model, tensors, peft_config)
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json_atomic(tmp / CONFIG_NAME, peft_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def adapter_state_dict(model: nn.Module, parameters: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors under PEFT's saved key names (contiguous, unshared copies), read from the
    model or, when given, from `parameters` (parameter name -> tensor)."""
    source = parameters if parameters is not None else dict(model.named_parameters(remove_duplicate=False))
    return {key: source[name].detach().contiguous().clone() for key, name in saved_keys(model).items()}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters an adapter file holds (the values of saved_keys)."""
    return list(saved_keys(model).values())


def saved_keys(model: nn.Module) -> dict[str, str]:
    """Saved key -> the model's parameter name of every tensor an adapter file holds: LoRA A and B, DoRA
    magnitudes, biases per config.bias (same names), the trained copies of modules_to_save (`<module>.<param>`)
    and the trained token rows (`<module>.token_adapter.trainable_tokens_delta`, once for tied layers)."""
    config = adapter_config(model)
    wanted = [".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"]
    wrapped = [*modules_to_save(model), *token_layers(model)]
    keys = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        is_bias = name.endswith(".bias") and (
            config.bias == "all" or (config.bias == "lora_only" and name.endswith(".base_layer.bias"))
        )
        if is_bias or any(name.endswith(w) for w in wanted):
            keys[KEY_PREFIX + name] = name
    for module_name, wrapper in modules_to_save(model).items():
        for param_name, _ in getattr(wrapper, COPY_ATTR).named_parameters():
            keys[f"{KEY_PREFIX}{module_name}.{param_name}"] = f"{module_name}.{COPY_ATTR}.{param_name}"
    for module_name, layer in token_layers(model).items():
        if layer.owns_delta:
            keys[f"{KEY_PREFIX}{module_name}.{SAVED_DELTA}"] = f"{module_name}.{DELTA}"
    return keys


def pissa_as_lora(model: nn.Module, tensors: dict[str, torch.Tensor],
                  peft_config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT's PiSSA -> LoRA conversion: A' = [A; A0], B' = [B, -B0], so s·B'A' = s·(B A - B0 A0) applies to the
    original W0 (= residual + s·B0 A0). Rank doubles and alpha is multiplied by 2 (sqrt(2) with rsLoRA) to keep s."""
    tensors = dict(tensors)
    for name, layer in lora_layers(model).items():
        key = KEY_PREFIX + name
        a0, b0 = initial_factors(layer)
        tensors[f"{key}.lora_A.weight"] = torch.cat([tensors[f"{key}.lora_A.weight"], a0.to(layer.lora_A.weight.dtype)], 0)
        tensors[f"{key}.lora_B.weight"] = torch.cat([tensors[f"{key}.lora_B.weight"], -b0.to(layer.lora_B.weight.dtype)], 1)
    alpha_factor = math.sqrt(2) if peft_config["use_rslora"] else 2
    converted = dict(peft_config, r=2 * peft_config["r"], lora_alpha=alpha_factor * peft_config["lora_alpha"],
                     init_lora_weights=True)
    converted["rank_pattern"] = {k: 2 * v for k, v in peft_config["rank_pattern"].items()}
    converted["alpha_pattern"] = {k: alpha_factor * v for k, v in peft_config["alpha_pattern"].items()}
    return tensors, converted


def to_peft_config(config: AdapterConfig, model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json dict PEFT expects; targets are written as the exact list attached."""
    layers = lora_layers(model)
    targets = getattr(model, TARGETS_ATTR)
    name_or_path = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "generate") else None,
        "base_model_name_or_path": name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": minimal_suffixes(model, targets),
        "exclude_modules": None,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": True if config.init == "default" else config.init,
        "loftq_config": {"loftq_bits": 4, "loftq_iter": config.loftq_iter} if config.init == "loftq" else {},
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "trainable_token_indices": _plain(config.trainable_token_indices),
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
        "inference_mode": True,
        "revision": None,
    }


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Read adapter_config.json (ours or PEFT's) into an AdapterConfig; unsupported features are errors."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {str(path)!r} does not exist: pass the folder that holds {CONFIG_NAME}.")
    if not config_file.is_file():
        raise AdapterFileError(f"{config_file} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{config_file} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_file} holds a JSON {type(raw).__name__}, not an object of adapter settings "
                               "(peft_type, r, lora_alpha, target_modules, ...); re-save the adapter.")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{config_file}: peft_type={peft_type!r}; lorafit loads LoRA adapters (peft_type 'LORA').")
    for key, what in _UNSUPPORTED_WHEN_SET.items():
        if raw.get(key) not in (None, False, [], {}, ""):
            raise AdapterFileError(f"{config_file}: {key}={raw[key]!r} ({what}) is not supported by lorafit yet.")
    init = raw.get("init_lora_weights", True)
    try:
        return AdapterConfig(
            r=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=raw.get("target_modules"),
            exclude_modules=raw.get("exclude_modules"),
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            bias=raw.get("bias", "none"),
            init=True if init is False else init,  # False (PEFT's random B) is overwritten by the saved weights
            loftq_iter=(raw.get("loftq_config") or {}).get("loftq_iter", 1),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            modules_to_save=raw.get("modules_to_save") or None,
            trainable_token_indices=raw.get("trainable_token_indices") or None,
        )
    except ConfigError as err:
        raise AdapterFileError(f"{config_file}: {err}") from err


def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in folder `path` (by lorafit or PEFT) to a plain base model and load its weights.
    A folder with a tokenizer (added tokens) first grows the model's embeddings to its vocabulary."""
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_weights(path / WEIGHTS_NAME)
    tokenizer = read_adapter_tokenizer(path)
    if tokenizer is not None:  # a run that added tokens: the base grows to its vocabulary (placeholder rows)
        resize_vocabulary(model, len(tokenizer))
    config = replace(config, modules_to_save=present_entries(model, config.modules_to_save))
    attach(model, config, warn_scale=False)
    _load_tensors(model, tensors, path / WEIGHTS_NAME)
    if not trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def read_adapter_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the adapter (by a run with data.added_tokens), or None when the folder has none."""
    path = Path(path)
    if not (path / TOKENIZER_CONFIG).is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in folder `path`, checked to be finite, without touching any model."""
    return _read_weights(Path(path) / WEIGHTS_NAME)


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy adapter tensors (as `read_adapter_weights` returns them, read from `source`) into a model that already
    carries the same adapter (resume); a missing, extra or wrongly shaped tensor is an AdapterFileError."""
    _load_tensors(model, tensors, Path(source) / WEIGHTS_NAME)


def non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, 'NaN' or 'inf') of the first floating-point tensor holding a non-finite value, else None."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key, "NaN" if bool(torch.isnan(tensor).any()) else "inf"
    return None


def _read_weights(weights_file: Path) -> dict[str, torch.Tensor]:
    if not weights_file.is_file():
        raise AdapterFileError(f"{weights_file} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{weights_file} cannot be read ({err}); the file is truncated or corrupt: re-save it.") from err
    if bad := non_finite(tensors):
        raise AdapterFileError(f"{weights_file}: tensor {bad[0]!r} holds {bad[1]} values; the adapter was saved from a "
                               "diverged run or is damaged: use an earlier checkpoint's adapter or retrain.")
    return tensors


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    keys = saved_keys(model)
    expected = {n for n in keys.values() if n not in _bias_names(model)}  # biases: PEFT's files may omit them
    tables = {k: v for k, v in _resized_tables(model).items() if k not in keys}
    loaded = set()
    for key, tensor in tensors.items():
        key = KEY_PREFIX + _strip_adapter_name(key.removeprefix(KEY_PREFIX))
        name = keys.get(key) or tables.get(key)
        if name is None:
            raise AdapterFileError(
                f"{weights_file}: tensor {key!r} has no place in this model with this adapter_config.json; the "
                "adapter was trained on another architecture or with other target_modules / modules_to_save / "
                "trainable_token_indices: load it on the base it was trained on."
            )
        param = params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{weights_file}: {key!r} has shape {tuple(tensor.shape)} but this model needs {tuple(param.shape)}; "
                "the adapter was trained on a model of another size."
            )
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise AdapterFileError(f"{weights_file} lacks {len(missing)} adapter tensors, e.g. {missing[0]!r}; re-save the adapter.")


def _resized_tables(model: nn.Module) -> dict[str, str]:
    """Saved key -> parameter name of the whole embedding / head tables PEFT saves beside the adapter when the
    vocabulary was resized (save_embedding_layers): `<module>.token_adapter.base_layer.weight` of a trained-rows
    layer, else `<module>.weight`. Loading them sets the base's tables, as PEFT does; lorafit never writes them (its
    new rows start at a deterministic placeholder and every one is trained: models/vocabulary.py)."""
    tables = {f"{KEY_PREFIX}{name}.{SAVED_DELTA.rsplit('.', 1)[0]}.base_layer.weight": f"{name}.base_layer.weight"
              for name in token_layers(model)}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()) if hasattr(
            model, "get_input_embeddings") else ():
        name = next((n for n, m in model.named_modules() if m is module and n), None)
        if name and isinstance(module, (nn.Embedding, nn.Linear)):
            tables[f"{KEY_PREFIX}{name}.weight"] = f"{name}.weight"
    return tables


def _bias_names(model: nn.Module) -> set[str]:
    return {n for n in saved_keys(model).values() if n.endswith(".bias") and f".{COPY_ATTR}." not in n}


def _plain(indices: Any) -> Any:
    """trainable_token_indices as JSON data (lists, dicts of lists), or None."""
    if indices is None:
        return None
    return {k: list(v) for k, v in indices.items()} if isinstance(indices, dict) else list(indices)


def _strip_adapter_name(name: str) -> str:
    """PEFT keys carry no adapter name on disk, but accept in-memory style `lora_A.default.weight` too."""
    name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    name = name.replace(".modules_to_save.default.", ".").replace(f".{SAVED_DELTA}.default", f".{SAVED_DELTA}")
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
