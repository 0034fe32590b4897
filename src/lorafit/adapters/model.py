"""Attach adapters to an existing model, report parameters, merge / unmerge / unload, disable."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorafit.adapters.fused import install_fused_forwards, remove_fused_forwards
from lorafit.adapters.init import initialize, original_base, restore_pissa_base
from lorafit.adapters.lora import LoraLinear
from lorafit.adapters.modules_to_save import (
    ModuleToSave,
    modules_to_save,
    modules_to_save_names,
    unwrap_modules_to_save,
    wrap_modules_to_save,
)
from lorafit.adapters.targets import TargetError, describe_linear_layers, select_targets
from lorafit.adapters.trainable_tokens import (
    TrainableTokens,
    plan_trainable_tokens,
    token_layers,
    unwrap_trainable_tokens,
    wrap_trainable_tokens,
)
from lorafit.config import (
    AdapterConfig,
    ConfigError,
    LorafitWarning,
    lora_scale,
    scale_warning,
)
from lorafit.models.frozen_16bit import Frozen16bitEmbedding, plain_modules
from lorafit.quant.linear4bit import Linear4bit

CONFIG_ATTR = "lorafit_adapter_config"
TARGETS_ATTR = "lorafit_adapter_targets"


def attach(model: nn.Module, config: AdapterConfig, *, warn_scale: bool = True) -> nn.Module:
    """Wrap the chosen layers in LoraLinear in place, freeze everything else, wrap config.modules_to_save (trained
    in full) and the layers of config.trainable_token_indices (trained rows), and return the model."""
    if adapter_config(model) is not None:
        raise ConfigError("this model already carries a lorafit adapter: call detach() or merge_and_unload() first.")
    if warn_scale and (message := scale_warning(config)):
        warnings.warn(message, LorafitWarning, stacklevel=2)
    targets = select_targets(model, config.target_modules, config.exclude_modules)
    saved = modules_to_save_names(model, config.modules_to_save or [])
    token_plan = plan_trainable_tokens(model, config, saved)
    auxiliary = saved + [name for name, _, _ in token_plan]  # LoRA never adapts inside them (PEFT's rule too)
    targets = [t for t in targets if not any(t == a or t.startswith(a + ".") for a in auxiliary)]
    if not targets:
        raise TargetError(f"target_modules={config.target_modules!r} matches only modules that modules_to_save or "
                          f"trainable_token_indices train: leave some layer to adapt. {describe_linear_layers(model)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        r, alpha = config.rank_and_alpha(name)
        layer = LoraLinear(model.get_submodule(name), r, alpha, lora_scale(alpha, r, config.use_rslora), config.dropout,
                           use_dora=config.use_dora, dora_dropout_lowrank_only=config.dora_dropout_lowrank_only)
        initialize(layer, config)
        _replace_module(model, name, layer)
    _set_bias_trainable(model, config.bias)
    wrap_modules_to_save(model, saved)
    wrap_trainable_tokens(model, token_plan)
    install_fused_forwards(model)  # activation memory: fused MLP tail and RMSNorm (adapters/fused.py)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, TARGETS_ATTR, targets)
    return model


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The AdapterConfig a model was attached with, or None for a plain model."""
    return getattr(model, CONFIG_ATTR, None)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear of the model by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge(model: nn.Module) -> None:
    """Fold every adapter update into its base weight (fast inference, same outputs)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): subtract every adapter update from its base weight."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def detach(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the model returns to its base weights."""
    return _unwrap(model, merge_first=False)


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every adapter and replace each LoraLinear by its base layer: an ordinary transformers model.

    A 4-bit base is dequantised: each adapted layer becomes an nn.Linear holding W0 + s·B A (or DoRA's merged
    weight) computed in fp32 and stored in `dtype` (default: the dtype of the model's input embeddings), and
    every other Linear4bit is dequantised the same way, so the result holds no 4-bit layer. Modules of
    modules_to_save become their trained copies; trained token rows are written into their embedding (and head).
    Embeddings and head kept 16-bit under QLoRA (models/frozen_16bit.py) make the default `dtype` that 16-bit
    dtype, the checkpoint's: they become plain modules and the whole model is cast to it, one coherent model as the
    checkpoint was. Pass dtype=torch.float32 to keep fp32.
    """
    embeddings = _base_of(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    kept_16bit = isinstance(embeddings, Frozen16bitEmbedding)
    if dtype is None:
        dtype = torch.float32 if embeddings is None else embeddings.weight.dtype
    _unwrap(model, merge_first=True, dtype=dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            _replace_module(model, name, _dense_linear(module.dequantize(torch.float32), module.bias, dtype))
    if kept_16bit:
        plain_modules(model)
        model.to(dtype)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its original base (the reference policy for GRPO); no weight copy.

    Each layer's adapter is switched off and its base computes the original weight (original_base: PiSSA adds its
    initial factors back to the residual). A merged layer is unmerged for the block and merged again after it.
    """
    with ExitStack() as stack:
        for layer in lora_layers(model).values():
            if layer.merged:
                layer.unmerge()
                stack.callback(layer.merge)
            layer.disabled = True
            stack.callback(setattr, layer, "disabled", False)
            stack.enter_context(original_base(layer))
        for module in [*modules_to_save(model).values(), *token_layers(model).values()]:
            module.disabled = True
            stack.callback(setattr, module, "disabled", False)
        yield model


@dataclass
class ParameterReport:
    """Trainable vs total parameters, with the adapter parameters broken down per layer kind."""

    trainable: int
    total: int
    per_kind: dict[str, tuple[int, int]]  # leaf name (q_proj, lm_head (full copy), ...) -> (layers, parameters)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"]
        if self.per_kind:
            width = max(16, *(len(kind) + 2 for kind in self.per_kind))
            lines.append(f"  {'layer kind':<{width}}{'layers':>8}{'adapter params':>18}")
            for kind, (count, params) in sorted(self.per_kind.items()):
                lines.append(f"  {kind:<{width}}{count:>8}{params:>18,}")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters (shared weights once) and adapters per layer kind."""
    storage = {id(p) for m in model.modules() if isinstance(m, Linear4bit) for p in m.quant_parameters()}
    params = [p for p in model.parameters() if id(p) not in storage]  # deduplicated: tied embeddings count once
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, layer in lora_layers(model).items():
        entry = per_kind[name.rsplit(".", 1)[-1]]
        entry[0] += 1
        entry[1] += sum(p.numel() for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)
                        if p is not None)
    for name, wrapper in modules_to_save(model).items():  # trained in full: one line per module
        per_kind[f"{name.rsplit('.', 1)[-1]} (full copy)"] = [1, sum(p.numel() for p in wrapper.trained_copy.parameters())]
    for name, layer in token_layers(model).items():
        if layer.owns_delta:
            per_kind[f"{name.rsplit('.', 1)[-1]} (token rows)"] = [1, layer.trainable_tokens_delta.numel()]
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return ParameterReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params) + quantized,  # 4-bit weights are packed codes, not parameters
        per_kind={k: (v[0], v[1]) for k, v in per_kind.items()},
    )


def _unwrap(model: nn.Module, merge_first: bool, dtype: torch.dtype | None = None) -> nn.Module:
    for name, layer in lora_layers(model).items():
        replacement = layer.base_layer
        if merge_first and isinstance(layer.base_layer, Linear4bit):
            with torch.no_grad():
                replacement = _dense_linear(layer.merged_weight(), layer.base_layer.bias, dtype)
        elif merge_first:
            layer.merge()
        else:
            layer.unmerge()
            restore_pissa_base(layer)
        _replace_module(model, name, replacement)
    unwrap_modules_to_save(model, keep_trained=merge_first, dtype=dtype)
    unwrap_trainable_tokens(model, merge=merge_first)
    remove_fused_forwards(model)
    for attr in (CONFIG_ATTR, TARGETS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _base_of(module: nn.Module | None) -> nn.Module | None:
    """The frozen base module behind a modules_to_save or trainable-tokens wrapper (the module itself otherwise)."""
    if isinstance(module, ModuleToSave):
        return module.original_module
    return module.base_layer if isinstance(module, TrainableTokens) else module


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear holding an (out, in) weight and a bias, in `dtype`, on the weight's device."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _set_bias_trainable(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for layer in lora_layers(model).values():
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
