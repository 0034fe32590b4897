"""Pre-training config checks: settings that run but are likely to train badly, each with the fix.

Printed by `lorafit check RUN.yaml` and at the start of `lorafit train`; nothing here loads weights
unless a model is passed in (then target_modules are resolved exactly instead of by typical names).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lorafit.adapters.io import read_adapter_config
from lorafit.adapters.targets import TargetError, name_matches, select_targets
from lorafit.config import (
    HEALTHY_SCALE,
    PYTHON_NAMES,
    RSLORA_MIN_RANK,
    AdapterConfig,
    alpha_for_scale,
    lora_scale,
    scale_advice,
)
from lorafit.run_config import RunConfig

# Adam moves every entry of A and B by about lr per step whatever the gradient's size, so the effective
# update s*B*A grows by about lr*s per step. Recipes that train well sit at lr*s ~ 5e-5 (QLoRA: 2e-4 x 16/64)
# to ~1e-3 (2e-4 x alpha=2r gives 4e-4; the quickstart's short run on a tiny task uses 1e-3 x 2 = 2e-3, the
# edge); above that, loss spikes and divergence become common.
LR_SCALE_HIGH = 2e-3

# Typical feed-forward layer names (Llama/Qwen/Mistral, GPT-2, Mixtral, Falcon/GPT-NeoX, OPT/Phi) used to
# judge a list or regex of target_modules when no model is at hand.
TYPICAL_MLP_NAMES = (
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "transformer.h.0.mlp.c_fc",
    "transformer.h.0.mlp.c_proj",
    "model.layers.0.block_sparse_moe.experts.0.w1",
    "model.layers.0.block_sparse_moe.experts.0.w2",
    "model.layers.0.block_sparse_moe.experts.0.w3",
    "transformer.h.0.mlp.dense_h_to_4h",
    "transformer.h.0.mlp.dense_4h_to_h",
    "model.layers.0.mlp.fc1",
    "model.layers.0.mlp.fc2",
)

Level = Literal["warning", "info"]


@dataclass(frozen=True)
class Check:
    """One finding: `warning` = likely to hurt this run, `info` = a suggestion; `fix` says what to change."""

    level: Level
    code: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message} Fix: {self.fix} [{self.code}]"


def check_run_config(
    config: RunConfig, previous_findings: Sequence[dict[str, Any]] | None = None, *, model: nn.Module | None = None
) -> list[Check]:
    """Warnings and suggestions for a run config; `previous_findings` is the loss-curve diagnosis of an earlier run.

    With `model`, target_modules are resolved on it (a target that matches nothing raises TargetError, as attach would).
    A run that starts from `init_adapter` is checked with that adapter's own config (AdapterFileError if unreadable).
    """
    adapter = _adapter_of(config)
    checks = _scale_checks(adapter, config.training.lr)
    checks += _target_checks(adapter, model)
    checks += _quantisation_checks(adapter, config.quantize)
    checks += _history_checks(adapter, previous_findings or [])
    return checks


def format_checks(checks: Iterable[Check], title: str = "config checks") -> str:
    """Printable lines, warnings first; says so when there is nothing to report."""
    ordered = sorted(checks, key=lambda c: c.level != "warning")
    if not ordered:
        return f"{title}: no issues found"
    return "\n".join([f"{title}:"] + [f"  {check}" for check in ordered])


def _adapter_of(config: RunConfig) -> AdapterConfig:
    return read_adapter_config(config.init_adapter) if config.init_adapter else config.adapter


def _scale_checks(adapter: AdapterConfig, lr: float) -> list[Check]:
    checks = []
    advice = scale_advice(adapter.alpha, adapter.r, adapter.use_rslora)
    if advice is not None:
        checks.append(Check("warning", "scale_out_of_range", advice.problem() + ".", advice.fix(PYTHON_NAMES)))
    elif not adapter.use_rslora and adapter.r >= RSLORA_MIN_RANK:
        keep = alpha_for_scale(adapter.scale, adapter.r, True)  # the alpha whose alpha/sqrt(r) equals today's scale
        checks.append(Check(
            "info", "rslora_recommended",
            f"r={adapter.r} uses alpha/r scaling, which shrinks the update as r grows; from r >= {RSLORA_MIN_RANK} "
            "rank-stabilised LoRA (alpha/sqrt(r)) keeps higher ranks learning as fast as low ones.",
            f"set adapter.use_rslora: true with adapter.alpha: {keep:.3g} (the same scale "
            f"{lora_scale(keep, adapter.r, True):.3g} at this r; a change of r then moves it by sqrt(r), not r; "
            f"keep it in {list(HEALTHY_SCALE)}).",
        ))
    step = lr * adapter.scale
    if step > LR_SCALE_HIGH:
        checks.append(Check(
            "warning", "lr_scale_high",
            f"training.lr x scale = {lr:g} x {adapter.scale:.3g} = {step:.3g} is above {LR_SCALE_HIGH:g}: Adam moves "
            "A and B by about lr per step, so the adapter's update grows by about lr x scale per step and "
            "loss spikes or divergence become likely.",
            f"lower training.lr to {LR_SCALE_HIGH / adapter.scale:.2g} or less, or lower adapter.alpha.",
        ))
    return checks


def _target_checks(adapter: AdapterConfig, model: nn.Module | None) -> list[Check]:
    if _adapts_mlp(adapter.target_modules, adapter.exclude_modules, model):
        return []
    return [Check(
        "warning", "targets_miss_mlp",
        f"target_modules={adapter.target_modules!r} adapts no MLP (feed-forward) layer: attention-only adapters "
        "learn formats and styles but little new knowledge, a risk for a task far from the base model's "
        "data (new domain, vocabulary or language).",
        "use adapter.target_modules: all-linear, or add the MLP layers (e.g. gate_proj, up_proj, down_proj).",
    )]


def _adapts_mlp(targets: str | list[str], exclude: str | list[str] | None, model: nn.Module | None) -> bool:
    """Whether any MLP layer is targeted: resolved on `model` when given, else judged on typical layer names."""
    if model is not None:
        try:
            mlp = set(select_targets(model, "mlp"))
        except TargetError:
            return True  # no layer sits in a block named mlp/feed_forward/ffn: nothing to judge by
        return bool(mlp & set(select_targets(model, targets, exclude)))
    if targets == "attention":
        return False

    def targeted(name: str) -> bool:
        chosen = targets in ("all-linear", "mlp") or name_matches(name, targets)
        return chosen and not (exclude is not None and name_matches(name, exclude))

    return any(targeted(name) for name in TYPICAL_MLP_NAMES)


def _quantisation_checks(adapter: AdapterConfig, quantize: str | None) -> list[Check]:
    if not quantize or adapter.init == "loftq":
        return []
    return [Check(
        "info", "quantized_without_loftq",
        f"the base is quantised (quantize: {quantize}) and adapter.init is {adapter.init!r}: the adapter starts "
        "from the quantised weights, so it must first learn back the quantisation error.",
        "set adapter.init: loftq (A and B start as a rank-r fit of the quantisation error W - Q).",
    )]


def _history_checks(adapter: AdapterConfig, previous_findings: Sequence[dict[str, Any]]) -> list[Check]:
    plateau = next((f for f in previous_findings if f.get("pattern") == "early_plateau"), None)
    if plateau is None or adapter.use_dora:
        return []
    evidence = ", ".join(f"{key}={value}" for key, value in (plateau.get("evidence") or {}).items())
    return [Check(
        "info", "dora_suggested",
        f"the previous run's loss plateaued early ({evidence or 'no evidence given'}).",
        "try adapter.use_dora: true (DoRA trains each weight's magnitude and direction apart and often keeps "
        "improving where LoRA stalls), or raise adapter.r.",
    )]


__all__ = ["LR_SCALE_HIGH", "Check", "check_run_config", "format_checks"]
