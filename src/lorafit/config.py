"""AdapterConfig: the adapter's hyper-parameters (PEFT-compatible), their validation, the LoRA scale and the rule
for a healthy scale (the range, when to use rsLoRA, and the advice text that attach, the config checks and the
loss-curve diagnosis all print)."""

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
HEALTHY_SCALE = (0.5, 4.0)  # effective scales s at which LoRA trains well
RSLORA_MIN_RANK = 32  # from here alpha/r shrinks updates enough that rank-stabilised scaling matters (rsLoRA paper)
LOWER_RANK_FROM = 64  # a too-small scale at r >= 64 can also be fixed by a lower r


class ConfigError(UserError):
    """A configuration value is invalid; the message names the field and the fix."""


class LorafitWarning(UserWarning):
    """A setting that runs but is likely to hurt training (e.g. a tiny effective scale)."""


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor s in W0 + s·B·A: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def scale_rule(alpha: float, r: int, use_rslora: bool) -> str:
    """How the scale is formed, for messages: 'alpha/r = 16/64' or 'alpha/sqrt(r) = 16/sqrt(64)'."""
    return f"alpha/sqrt(r) = {alpha:g}/sqrt({r})" if use_rslora else f"alpha/r = {alpha:g}/{r}"


def alpha_for_scale(scale: float, r: int, use_rslora: bool) -> float:
    """The alpha that gives the effective scale `scale` at rank r (lora_scale solved for alpha)."""
    return scale * (math.sqrt(r) if use_rslora else r)


@dataclass
class AdapterConfig:
    """Hyper-parameters of a LoRA adapter; field meanings follow PEFT's LoraConfig.

    target_modules: "all-linear" (every linear layer but the output head), "attention", "mlp",
    a list of module-name suffixes, or a regex matched against the full module name.
    rank_pattern / alpha_pattern map a module-name regex to its own r / alpha (PEFT semantics).
    modules_to_save: modules trained in full beside the adapter (a trainable copy; PEFT's matching: a module whose
    name ends with an entry), e.g. ["embed_tokens", "lm_head"] (adapters/modules_to_save.py).
    trainable_token_indices: rows of the input embedding trained as replacement rows, a list of token ids (or, in a
    run file, token strings), or a dict module name -> list for other/more embeddings and an untied head
    (adapters/trainable_tokens.py).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    # DoRA with dropout: false = PEFT's formula (exact parity; one extra W0·dropout(x) matmul per layer and step, a
    # sparse product over the dropped entries in fp32 on CPU at dropout <= 0.1: adapters/dropped_entries.py);
    # true = dropout on the low-rank path only, y = bias + m/||W0 + s·BA|| ⊙ (W0 x + s·B A dropout(x)): LoRA's cost.
    # Training only (eval and saved adapters are the same DoRA), so it is not written to adapter_config.json.
    dora_dropout_lowrank_only: bool = False
    bias: str = "none"
    init: str = "default"
    loftq_iter: int = 1  # alternations of NF4 quantisation and SVD for init="loftq"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int | str] | dict[str, list[int | str]] | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} is invalid: use a number in [0, 1), e.g. 0.05 (or 0 for none).")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} is unknown: use one of {', '.join(BIAS_MODES)}.")
        if self.init is True:  # PEFT's init_lora_weights=True
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
        if not isinstance(self.dora_dropout_lowrank_only, bool):
            raise ConfigError(f"dora_dropout_lowrank_only={self.dora_dropout_lowrank_only!r} is invalid: use true or false.")
        _check_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_targets("exclude_modules", self.exclude_modules)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if self.modules_to_save is not None:
            _check_module_list(self.modules_to_save)
        if self.trainable_token_indices is not None:
            _check_token_indices(self.trainable_token_indices, self.modules_to_save or [])

    def token_indices_by_module(self, input_embeddings: str) -> dict[str, list[int | str]]:
        """trainable_token_indices as PEFT reads it: a list is for the input embeddings (their module name given)."""
        indices = self.trainable_token_indices
        if indices is None:
            return {}
        return dict(indices) if isinstance(indices, dict) else {input_embeddings: list(indices)}

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


@dataclass(frozen=True)
class SettingNames:
    """How scale advice names the adapter settings: as AdapterConfig arguments or as keys of a run file."""

    alpha: str
    r: str
    rslora_on: str  # the setting that turns rank-stabilised scaling on
    scale_format: str  # format spec of the scale rsLoRA would give


PYTHON_NAMES = SettingNames(alpha="alpha", r="r", rslora_on="use_rslora=True", scale_format=".2f")
RUN_FILE_NAMES = SettingNames(alpha="adapter.alpha", r="adapter.r", rslora_on="adapter.use_rslora: true",
                              scale_format=".3g")


@dataclass(frozen=True)
class ScaleAdvice:
    """An effective scale outside HEALTHY_SCALE, and what brings it back inside."""

    alpha: float
    r: int
    use_rslora: bool
    scale: float  # lora_scale(alpha, r, use_rslora)

    @property
    def too_low(self) -> bool:
        return self.scale < HEALTHY_SCALE[0]

    def problem(self) -> str:
        """What is wrong, e.g. 'effective LoRA scale alpha/r = 16/64 = 0.25 is outside [0.5, 4.0]'."""
        low, high = HEALTHY_SCALE
        return (f"effective LoRA scale {scale_rule(self.alpha, self.r, self.use_rslora)} = {self.scale:.3g} "
                f"is outside [{low}, {high}]")

    def fix(self, names: SettingNames = PYTHON_NAMES) -> str:
        """What to change, naming the settings as `names` does."""
        low, high = HEALTHY_SCALE
        if not self.too_low:
            return (f"lower {names.alpha} to at most {alpha_for_scale(high, self.r, self.use_rslora):g}, "
                    f"or raise {names.r}. A large scale makes updates unstable.")
        fixes = [f"raise {names.alpha} to at least {alpha_for_scale(low, self.r, self.use_rslora):g}"]
        if not self.use_rslora and self.r >= RSLORA_MIN_RANK:
            rslora_scale = lora_scale(self.alpha, self.r, True)
            fixes.append(f"or set {names.rslora_on} (scale {rslora_scale:{names.scale_format}})")
        if self.r >= LOWER_RANK_FROM:
            fixes.append(f"or lower {names.r}")
        return "; ".join(fixes) + ". A small scale makes training look fine but crawl."

    def text(self, names: SettingNames = PYTHON_NAMES) -> str:
        return f"{self.problem()}: {self.fix(names)}"


def scale_advice(alpha: float, r: int, use_rslora: bool) -> ScaleAdvice | None:
    """ScaleAdvice when alpha, r and rsLoRA give an effective scale outside HEALTHY_SCALE, else None."""
    scale = lora_scale(alpha, r, use_rslora)
    low, high = HEALTHY_SCALE
    return None if low <= scale <= high else ScaleAdvice(alpha, r, use_rslora, scale)


def scale_warning(config: AdapterConfig) -> str | None:
    """A message when the effective scale lies outside the range where LoRA trains well, else None."""
    advice = scale_advice(config.alpha, config.r, config.use_rslora)
    return advice.text(PYTHON_NAMES) if advice else None


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


def _check_module_list(value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"modules_to_save={value!r} is invalid: use a non-empty list of module names, "
                          "e.g. [embed_tokens, lm_head] (or null for none).")


def _check_token_list(where: str, value: Any) -> None:
    ok = isinstance(value, (list, tuple)) and value and all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v) for v in value)
    if not ok:
        raise ConfigError(f"{where}={value!r} is invalid: use a non-empty list of token ids (integers >= 0) or "
                          "token strings, e.g. [128002, '<tool_call>'].")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}={value!r} lists a token twice: list each token once.")


def _check_token_indices(value: Any, modules_to_save: list[str]) -> None:
    if isinstance(value, dict):
        if not value:
            raise ConfigError("trainable_token_indices={} is empty: map a module name to token ids, "
                              "e.g. {embed_tokens: [128002]}, or use null.")
        for module, tokens in value.items():
            if not isinstance(module, str) or not module:
                raise ConfigError(f"trainable_token_indices key {module!r} must be a module name such as embed_tokens.")
            _check_token_list(f"trainable_token_indices[{module!r}]", tokens)
            if module in modules_to_save:  # PEFT's rule: a module is trained in full or by rows, not both
                raise ConfigError(f"trainable_token_indices[{module!r}] and modules_to_save both name {module!r}: "
                                  "a module is trained either in full (modules_to_save) or by rows, not both; "
                                  "remove it from one of them.")
        return
    _check_token_list("trainable_token_indices", value)
