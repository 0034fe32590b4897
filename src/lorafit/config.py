"""AdapterConfig: the adapter's hyper-parameters (PEFT-compatible), their validation and the LoRA scale."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorafit.errors import UserError

BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = ("default", "gaussian", "pissa", "pissa_niter_<K>", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
TARGET_SHORTHANDS = ("all-linear", "attention", "mlp")
HEALTHY_SCALE = (0.5, 4.0)


class ConfigError(UserError):
    """A configuration value is invalid; the message names the field and the fix."""


class LorafitWarning(UserWarning):
    """A setting that runs but is likely to hurt training (e.g. a tiny effective scale)."""


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor s in W0 + s·B·A: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class AdapterConfig:
    """Hyper-parameters of a LoRA adapter; field meanings follow PEFT's LoraConfig.

    target_modules: "all-linear" (every linear layer but the output head), "attention", "mlp",
    a list of module-name suffixes, or a regex matched against the full module name.
    rank_pattern / alpha_pattern map a module-name regex to its own r / alpha (PEFT semantics).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init: str = "default"
    loftq_iter: int = 1  # alternations of NF4 quantisation and SVD for init="loftq"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} is invalid: use a number in [0, 1), e.g. 0.05 (or 0 for none).")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} is unknown: use one of {', '.join(BIAS_MODES)}.")
        if self.init is True:
            self.init = "default"
        if not isinstance(self.init, str) or not (self.init in INIT_METHODS or _PISSA_NITER.fullmatch(self.init)):
            raise ConfigError(
                f"init={self.init!r} is not supported: use one of {', '.join(INIT_METHODS)} "
                "(K = subspace iterations of the randomised SVD, e.g. pissa_niter_4)."
            )
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter={self.loftq_iter!r} is invalid: use a positive integer (1 is PEFT's default).")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora={self.use_dora!r} is invalid: use true or false.")
        _check_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_targets("exclude_modules", self.exclude_modules)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)

    @property
    def pissa_niter(self) -> int | None:
        """Subspace iterations for init 'pissa_niter_K'; None for exact-SVD 'pissa' and for non-PiSSA inits."""
        match = _PISSA_NITER.fullmatch(self.init)
        return int(match.group(1)) if match else None

    @property
    def is_pissa(self) -> bool:
        return self.init == "pissa" or self.pissa_niter is not None

    @property
    def scale(self) -> float:
        """The effective scale of layers that follow the global r and alpha."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The (r, alpha) of one module: the first matching rank/alpha pattern wins, as in PEFT."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.alpha),
        )


def scale_warning(config: AdapterConfig) -> str | None:
    """A message when the effective scale lies outside the range where LoRA trains well, else None."""
    s = config.scale
    low, high = HEALTHY_SCALE
    if low <= s <= high:
        return None
    rule = f"alpha/sqrt(r) = {config.alpha}/sqrt({config.r})" if config.use_rslora else f"alpha/r = {config.alpha}/{config.r}"
    if s < low:
        fixes = [f"raise alpha to at least {_alpha_for(low, config):g}"]
        if not config.use_rslora and config.r >= 32:
            fixes.append(f"or set use_rslora=True (scale {lora_scale(config.alpha, config.r, True):.2f})")
        if config.r >= 64:
            fixes.append("or lower r")
        advice = "; ".join(fixes) + ". A small scale makes training look fine but crawl."
    else:
        advice = f"lower alpha to at most {_alpha_for(high, config):g}, or raise r. A large scale makes updates unstable."
    return f"effective LoRA scale {rule} = {s:.3g} is outside [{low}, {high}]: {advice}"


def _alpha_for(target_scale: float, config: AdapterConfig) -> float:
    return target_scale * (math.sqrt(config.r) if config.use_rslora else config.r)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: the rank must be a positive integer, e.g. 8 or 16.")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r} is invalid: alpha must be a positive number, commonly r or 2*r.")


def _check_targets(name: str, value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{name} is empty: use 'all-linear', 'attention', 'mlp', a list of names or a regex.")
        if value not in TARGET_SHORTHANDS:
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(f"{name}={value!r} is not a valid regex ({err}).") from err
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ConfigError(
        f"{name}={value!r} is invalid: use 'all-linear', 'attention', 'mlp', a non-empty list of module names, or a regex string."
    )
