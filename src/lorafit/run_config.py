"""RunConfig: one YAML file describes a whole run; validated (unknown keys, bad values) before any weight loads."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import AdapterConfig, ConfigError

SCHEDULES = ("cosine", "linear", "constant")
METRICS = ("json", "exact")


@dataclass
class DataConfig:
    """Training / evaluation files and how they become token batches."""

    train: str = ""
    eval: str | None = None
    max_seq_len: int = 1024
    packing: bool = True
    assistant_only: bool = True


@dataclass
class TrainingConfig:
    """Optimiser, schedule, precision and checkpointing. batch_size rows make one optimiser step."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    micro_batch_size: int | None = None  # rows per forward pass; defaults to batch_size (no accumulation)
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool | str = "auto"  # autocast to bf16; auto = on CUDA GPUs with bf16, off on CPU (slow there)
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints; 0 = only the final adapter
    keep_checkpoints: int = 2


@dataclass
class EvaluationConfig:
    """Held-out loss every `every` steps, and a generation metric before and after training."""

    every: int = 0
    generation: bool = True
    metric: str = "json"
    max_new_tokens: int = 64
    limit: int | None = None
    batch_size: int = 64


@dataclass
class RunConfig:
    """A whole run: base model, adapter, data, training, evaluation and where results go."""

    model: str = ""
    dtype: str = "float32"
    output_dir: str = "runs/run"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply `key.path=value` overrides, validate; errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, adapter, data, training, ...).")
    for override in overrides or []:
        apply_override(raw, override)
    try:
        config = build(RunConfig, raw, "")
        validate(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    config.data = _resolve_data_paths(config.data, path.parent)
    return config


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.path=value, e.g. training.lr=5e-4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict, recursing into nested sections; unknown keys suggest the nearest."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {dotted!r}{hint}")
        kind = _field_type(cls, key)
        kwargs[key] = build(kind, value, dotted) if dataclasses.is_dataclass(kind) else _check_type(value, kind, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from err


def validate(config: RunConfig) -> None:
    """Cross-field checks that a dataclass alone cannot express."""
    if not config.model:
        raise ConfigError("model is required: a short name (smollm2-135m), a folder, a .gguf file or a hub id.")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={config.dtype!r}: use float32, bfloat16 or float16.")
    if not config.data.train:
        raise ConfigError("data.train is required: a .jsonl, .json or .csv file of examples.")
    t = config.training
    positive = {"training.batch_size": t.batch_size, "training.lr": t.lr, "data.max_seq_len": config.data.max_seq_len,
                "training.log_every": t.log_every, "training.keep_checkpoints": t.keep_checkpoints}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name}={value!r} must be positive.")
    micro = t.micro_batch_size or t.batch_size
    if micro <= 0 or t.batch_size % micro:
        raise ConfigError(f"training.micro_batch_size={micro} must divide training.batch_size={t.batch_size}.")
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"training.schedule={t.schedule!r}: use one of {', '.join(SCHEDULES)}.")
    if t.bf16 not in (True, False, "auto"):
        raise ConfigError(f"training.bf16={t.bf16!r}: use true, false or auto.")
    if t.max_steps is None and not t.epochs > 0:
        raise ConfigError("training.epochs must be positive (or set training.max_steps).")
    if config.evaluation.metric not in METRICS:
        raise ConfigError(f"evaluation.metric={config.evaluation.metric!r}: use one of {', '.join(METRICS)}.")


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (written to the run folder as config.yaml)."""
    return dataclasses.asdict(config)


def _resolve_data_paths(data: DataConfig, base: Path) -> DataConfig:
    """Relative data paths are taken from the working folder if they exist there, else beside the YAML file."""

    def resolve(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute() or Path(p).exists():
            return p
        candidate = base / p
        return str(candidate) if candidate.exists() else p

    return dataclasses.replace(data, train=resolve(data.train), eval=resolve(data.eval))


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _check_type(value: Any, kind: Any, where: str) -> Any:
    """Accept value if it fits the annotation (ints for floats too); else say what was expected."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else (kind,)
    for option in allowed:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in allowed)
    raise ConfigError(f"{where}={value!r} should be {names}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
