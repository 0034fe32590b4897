"""RunConfig: one YAML file describes a whole run; validated (unknown keys, bad values) before any weight loads."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import AdapterConfig, ConfigError
from lorafit.evaluation.metrics import METRICS as METRIC_FUNCTIONS
from lorafit.quant import QUANT_SCHEMES

SCHEDULES = ("cosine", "linear", "constant")
METRICS = tuple(METRIC_FUNCTIONS)
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # built by train/optimizers.py
METHODS = ("sft", "grpo", "dpo")
METHOD_SECTIONS = {"grpo": ("rewards", "grpo"), "dpo": ("dpo",)}  # sections that only the named method reads
DPO_LOSSES = ("sigmoid", "ipo")
QUANTIZE = (None, *QUANT_SCHEMES)
DISTRIBUTED_STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class DataConfig:
    """Training / evaluation files and how they become token batches."""

    train: str = ""
    eval: str | None = None
    max_seq_len: int = 1024
    packing: bool = True
    assistant_only: bool = True
    added_tokens: list[str] = field(default_factory=list)  # new tokens: tokenizer + embeddings grow (models/vocabulary.py)


@dataclass
class TrainingConfig:
    """Optimiser, schedule, precision and checkpointing. batch_size rows make one optimiser step."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    micro_batch_size: int | None = None  # rows per forward pass; defaults to batch_size (no accumulation)
    lr: float = 2e-4
    optimizer: str = "adamw"  # adamw_8bit / paged_adamw_8bit (CUDA only): bitsandbytes, the [bnb] extra
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool | str = "auto"  # autocast to bf16; auto = where bf16 is fast (device.bf16_worthwhile)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block (train/compile.py); falls back to eager with a warning
    release_host_memory: bool = False  # freed host buffers back to the OS at once (device.return_freed_host_memory)
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints; 0 = only the final adapter
    keep_checkpoints: int = 2
    neftune_noise_alpha: float | None = None  # NEFTune: uniform noise * alpha/sqrt(seq_len*hidden) on input embeddings


@dataclass
class EvalSetConfig:
    """One named eval set: a chat file whose final assistant turns are the references, and its metric
    (None = evaluation.metric). In YAML either `name: FILE` or `name: {path: FILE, metric: contains}`."""

    path: str = ""
    metric: str | None = None


@dataclass
class EarlyStoppingConfig:
    """Stop training when the monitored held-out loss has not improved (loss < best - min_delta) for `patience`
    evaluations in a row; the run's adapter is then the best evaluation's (train/early_stopping.py owns the rule).
    monitor: eval_loss (the loss on data.eval) or the name of one of evaluation.sets (its held-out loss)."""

    patience: int = 3
    min_delta: float = 0.0
    monitor: str = "eval_loss"


@dataclass
class EvaluationConfig:
    """Held-out loss every `every` steps, and a generation metric before and after training."""

    every: int = 0
    generation: bool = True
    metric: str = "json"  # json: the first JSON object in the reply; json_strict: the whole reply; exact
    max_new_tokens: int = 64
    limit: int | None = None
    batch_size: int = 64
    sets: dict = field(default_factory=dict)  # name -> EvalSetConfig, e.g. {in_distribution: a.jsonl, ...}
    forgetting: bool | str = "auto"  # base vs adapter on general prompts after training; auto = on CUDA only
    measure: str | None = None  # dpo: `file.py:function` scoring each greedy held-out reply (a reward function)
    early_stopping: EarlyStoppingConfig | None = None  # {patience, min_delta, monitor}; null = train all steps

    def __post_init__(self) -> None:
        if not isinstance(self.sets, dict):
            raise ConfigError(f"sets={self.sets!r} must map names to files, e.g. {{out_of_distribution: ood.jsonl}}.")
        self.sets = {name: _eval_set(name, spec) for name, spec in self.sets.items()}


@dataclass
class RewardSpec:
    """One GRPO reward function, `file.py:function` or `package.module:function`, and its weight in the sum."""

    function: str = ""
    weight: float = 1.0


@dataclass
class GRPOConfig:
    """GRPO sampling and objective; training.batch_size counts prompts, each sampled num_generations times."""

    num_generations: int = 4  # completions per prompt: the group whose mean reward is the baseline
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 1.0
    beta: float = 0.04  # weight of the k3 KL to the starting policy (base with adapter off, or init_adapter); 0 = none
    epsilon: float = 0.2  # PPO clip range of the ratio to the sampling policy
    scale_rewards: bool = True  # divide advantages by the group's std (else mean-centering only)
    num_iterations: int = 1  # optimiser steps on each batch of samples (>1 makes the clipping bite)
    reward_timeout_s: float = 60.0  # seconds one call of a reward function may take; longer stops the run


@dataclass
class DPOConfig:
    """DPO objective (TRL's DPOTrainer); training.batch_size counts preference pairs."""

    beta: float = 0.1  # sigmoid: scale of the log-ratio margin; ipo: the margin aimed at is 1/(2 beta)
    loss: str = "sigmoid"  # sigmoid: -log sigmoid(beta delta) (DPO); ipo: (delta / tokens - 1/(2 beta))^2 (IPO)
    label_smoothing: float = 0.0  # sigmoid only: share of pairs assumed mislabelled (conservative DPO), in [0, 0.5)
    precompute_reference: bool = False  # reference log-probs of every pair once before training (no ref forward/step)


@dataclass
class DistributedConfig:
    """How a torchrun launch (several processes) trains; a 1-process run ignores it. training.batch_size stays the
    global batch: each process takes its share of every step's rows."""

    strategy: str = "auto"  # ddp replicates the model, fsdp shards it; auto: fsdp when it does not fit one device
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward (less memory)
    cpu_offload: bool = False  # fsdp: keep shards, gradients and the optimizer step on the CPU
    timeout_minutes: float = 30.0  # a collective waiting longer (a rank died or hangs) ends every rank with an error


@dataclass
class RunConfig:
    """A whole run: base model, adapter, data, training, evaluation and where results go."""

    model: str = ""
    dtype: str = "float32"
    output_dir: str = "runs/run"
    quantize: str | None = None  # "nf4": the base's block linears held in 4-bit NF4 (QLoRA); None = dtype
    double_quant: bool = True  # with quantize: NF4 block scales quantised to 8 bits (4.127 instead of 4.5 bits/weight)
    method: str = "sft"
    init_adapter: str | None = None  # start from a saved adapter folder (its own config replaces `adapter`)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, list):
            raise ConfigError(f"rewards={self.rewards!r} must be a list of 'file.py:function' entries "
                              "or {function: ..., weight: ...} mappings.")
        self.rewards = [_reward_spec(item, f"rewards[{i}]") for i, item in enumerate(self.rewards)]


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last one silently, so a
    run file with two `lr:` lines would train with whichever came last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}: keep one of them",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply `key.path=value` overrides, validate; errors name the file and key."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"run config {str(path)!r} is a folder; pass the run's YAML file, e.g. {path / 'run.yaml'}.")
    if not path.is_file():
        raise ConfigError(f"run config {str(path)!r} does not exist.")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
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
    return _resolve_paths(config, path.parent)


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
        section = _section_type(kind)
        kwargs[key] = build(section, value, dotted) if section and value is not None else _check_type(value, kind, dotted)
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
    added = config.data.added_tokens
    if not all(isinstance(token, str) and token for token in added) or len(set(added)) != len(added):
        raise ConfigError(f"data.added_tokens={added!r}: use a list of distinct, non-empty token strings, "
                          "e.g. ['<tool_call>', '</tool_call>'].")
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
    if not isinstance(t.compile, bool):
        raise ConfigError(f"training.compile={t.compile!r}: use true or false.")
    if not isinstance(t.release_host_memory, bool):
        raise ConfigError(f"training.release_host_memory={t.release_host_memory!r}: use true or false.")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"training.optimizer={t.optimizer!r}: use one of {', '.join(OPTIMIZERS)}.")
    if t.bf16 not in (True, False, "auto"):
        raise ConfigError(f"training.bf16={t.bf16!r}: use true, false or auto.")
    if t.max_steps is None and not t.epochs > 0:
        raise ConfigError("training.epochs must be positive (or set training.max_steps).")
    if config.evaluation.metric not in METRICS:
        raise ConfigError(f"evaluation.metric={config.evaluation.metric!r}: use one of {', '.join(METRICS)}.")
    if config.evaluation.forgetting not in (True, False, "auto"):
        raise ConfigError(f"evaluation.forgetting={config.evaluation.forgetting!r}: use true, false or auto "
                          "(auto = on when CUDA is available).")
    if t.neftune_noise_alpha is not None and not 0 <= t.neftune_noise_alpha < float("inf"):
        raise ConfigError(f"training.neftune_noise_alpha={t.neftune_noise_alpha!r} must be >= 0 (the NEFTune paper "
                          "uses 5-15; null or 0 = no noise).")
    if t.neftune_noise_alpha and config.method != "sft":
        raise ConfigError(f"training.neftune_noise_alpha applies to method: sft only (in {config.method} it would "
                          "perturb the log-prob ratios and the KL to the reference); remove it.")
    if config.init_adapter and config.adapter != AdapterConfig():
        raise ConfigError("set either adapter (a fresh adapter) or init_adapter (a saved one, whose own "
                          "adapter_config.json applies), not both.")
    if config.quantize not in QUANTIZE:
        raise ConfigError(f"quantize={config.quantize!r}: use one of {', '.join(map(str, QUANTIZE))} "
                          "(nf4 = 4-bit NormalFloat with double-quantised scales, as QLoRA).")
    check_init_fits_base(config, config.adapter, "adapter.init")
    if config.method not in METHODS:
        raise ConfigError(f"method={config.method!r}: use one of {', '.join(METHODS)}.")
    if config.method == "grpo":
        _validate_grpo(config)
    if config.method == "dpo":
        _validate_dpo(config.dpo)
    _validate_distributed(config.distributed)
    _validate_early_stopping(config)
    if config.evaluation.measure is not None:
        if config.method != "dpo":
            raise ConfigError("evaluation.measure applies to method: dpo only (grpo scores replies with its rewards, "
                              "sft with evaluation.metric); remove it.")
        _reward_spec(config.evaluation.measure, "evaluation.measure")  # the same form as a reward function
    defaults = RunConfig()
    for method, sections in METHOD_SECTIONS.items():
        if method != config.method and any(getattr(config, s) != getattr(defaults, s) for s in sections):
            what = (f"{' and the '.join(sections)} section apply" if len(sections) > 1
                    else f"the {sections[0]} section applies")
            raise ConfigError(f"{what} to method: {method} only; set method: {method} or remove "
                              f"{'them' if len(sections) > 1 else 'it'}.")


def check_init_fits_base(config: RunConfig, adapter: AdapterConfig, where: str) -> None:
    """LoftQ needs quantize: nf4 (with double quantisation, the format it quantises to); PiSSA needs a float base."""
    if adapter.init == "loftq" and config.quantize is None:
        raise ConfigError(f"{where}=loftq initialises adapters for a 4-bit base: also set quantize: nf4.")
    if adapter.init == "loftq" and not config.double_quant:
        raise ConfigError(f"{where}=loftq quantises the adapted layers with double quantisation (4.127 bits per "
                          "weight): set double_quant: true, or use another init.")
    if adapter.is_pissa and config.quantize is not None:
        raise ConfigError(f"{where}={adapter.init} needs a 16/32-bit base (its residual cannot be re-quantised "
                          "exactly): remove quantize, or use loftq for a 4-bit base.")


def _validate_grpo(config: RunConfig) -> None:
    g = config.grpo
    if not config.rewards:
        raise ConfigError("method grpo needs rewards: a list such as [my_rewards.py:correct, my_rewards.py:format].")
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations={g.num_generations} must be at least 2: advantages compare "
                          "completions of the same prompt.")
    positive = {"grpo.max_new_tokens": g.max_new_tokens, "grpo.temperature": g.temperature,
                "grpo.epsilon": g.epsilon, "grpo.num_iterations": g.num_iterations}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name}={value!r} must be positive.")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"grpo.top_p={g.top_p!r} must lie in (0, 1]; 1 keeps the whole distribution.")
    if not 0 <= g.beta < float("inf"):
        raise ConfigError(f"grpo.beta={g.beta!r} must be >= 0 (0 = no KL term, no reference model).")
    if not g.epsilon < 1:
        raise ConfigError(f"grpo.epsilon={g.epsilon!r} must be below 1 (the ratio is clipped to [1-eps, 1+eps]).")
    if not 0 < g.reward_timeout_s < float("inf"):
        raise ConfigError(f"grpo.reward_timeout_s={g.reward_timeout_s!r} must be a positive, finite number of seconds "
                          "(default 60): the longest one call of a reward function may take.")


def method_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A config as plain data (config.yaml) without the sections of other methods than its own: an SFT run's
    config has no rewards and no grpo section to show."""
    method = config.get("method") or RunConfig.method
    unused = {s for m, sections in METHOD_SECTIONS.items() if m != method for s in sections}
    return {key: value for key, value in config.items() if key not in unused}


def _validate_early_stopping(config: RunConfig) -> None:
    """evaluation.early_stopping needs evaluations (evaluation.every > 0) of a held-out loss: data.eval's (sft,
    dpo) or an evaluation set's (sft); GRPO has no held-out loss."""
    e = config.evaluation
    rule = e.early_stopping
    if rule is None:
        return
    where = "evaluation.early_stopping"
    if config.method == "grpo":
        raise ConfigError(f"{where} needs a held-out loss, which method: grpo does not compute (it evaluates "
                          "rewards of sampled replies); remove it, or pick the best checkpoint by eval_reward.")
    if not e.every > 0:
        raise ConfigError(f"{where} decides at each held-out evaluation: set evaluation.every to a number of steps "
                          "(e.g. 10), or remove early_stopping.")
    if not isinstance(rule.patience, int) or rule.patience < 1:
        raise ConfigError(f"{where}.patience={rule.patience!r} must be at least 1 (evaluations without improvement "
                          "before training stops; HF's default is 1, lorafit's 3).")
    if not 0 <= rule.min_delta < float("inf"):
        raise ConfigError(f"{where}.min_delta={rule.min_delta!r} must be >= 0 (how much lower than the best a loss "
                          "must be to count as an improvement; 0 = any decrease).")
    if config.method == "dpo":
        valid = ["eval_loss"]  # the held-out DPO loss of data.eval's pairs; eval sets are chats, not pairs
    else:
        valid = ["eval_loss", *e.sets]
    if rule.monitor not in valid:
        raise ConfigError(f"{where}.monitor={rule.monitor!r}: use one of {', '.join(valid)} (eval_loss = the "
                          "held-out loss on data.eval, or the name of one of evaluation.sets).")
    if rule.monitor == "eval":
        raise ConfigError(f"{where}.monitor=eval: the set's loss would be logged as eval_loss, the name of "
                          "data.eval's; rename the set in evaluation.sets.")
    if rule.monitor == "eval_loss" and not config.data.eval:
        raise ConfigError(f"{where}.monitor=eval_loss is the held-out loss on data.eval: set data.eval, or monitor "
                          "one of evaluation.sets by name.")


def _validate_distributed(d: DistributedConfig) -> None:
    if d.strategy not in DISTRIBUTED_STRATEGIES:
        raise ConfigError(f"distributed.strategy={d.strategy!r}: use one of {', '.join(DISTRIBUTED_STRATEGIES)} "
                          "(auto: fsdp when the model does not fit one device, else ddp).")
    if not 0 < d.timeout_minutes < float("inf"):
        raise ConfigError(f"distributed.timeout_minutes={d.timeout_minutes!r} must be a positive, finite number of "
                          "minutes (default 30).")


def _validate_dpo(d: DPOConfig) -> None:
    if not 0 < d.beta < float("inf"):
        raise ConfigError(f"dpo.beta={d.beta!r} must be positive (TRL's default is 0.1).")
    if d.loss not in DPO_LOSSES:
        raise ConfigError(f"dpo.loss={d.loss!r}: use one of {', '.join(DPO_LOSSES)}.")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={d.label_smoothing!r} must lie in [0, 0.5) (0 = plain DPO).")
    if d.loss == "ipo" and d.label_smoothing:
        raise ConfigError(f"dpo.label_smoothing={d.label_smoothing!r} applies to loss: sigmoid only; set it to 0 "
                          "for ipo.")


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (written to the run folder as config.yaml)."""
    return dataclasses.asdict(config)


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Relative paths (data, reward files, init_adapter) are taken from the working folder if they exist there,
    else beside the YAML file."""

    def resolve(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute() or Path(p).exists():
            return p
        candidate = base / p
        return str(candidate) if candidate.exists() else p

    def resolve_reward(spec: RewardSpec) -> RewardSpec:
        target, _, name = spec.function.rpartition(":")
        if not target.endswith(".py"):
            return spec  # package.module:function is found on the import path
        return dataclasses.replace(spec, function=f"{resolve(target)}:{name}")

    data = dataclasses.replace(config.data, train=resolve(config.data.train), eval=resolve(config.data.eval))
    sets = {name: dataclasses.replace(s, path=resolve(s.path)) for name, s in config.evaluation.sets.items()}
    measure = config.evaluation.measure
    evaluation = dataclasses.replace(config.evaluation, sets=sets,
                                     measure=measure and resolve_reward(RewardSpec(measure)).function)
    return dataclasses.replace(config, data=data, init_adapter=resolve(config.init_adapter), evaluation=evaluation,
                               rewards=[resolve_reward(r) for r in config.rewards])


def _reward_spec(item: Any, where: str) -> RewardSpec:
    """A reward entry as written in YAML ('path:function' or a mapping) becomes a checked RewardSpec."""
    if isinstance(item, str):
        item = RewardSpec(function=item)
    elif isinstance(item, dict):
        item = build(RewardSpec, item, where)
    elif not isinstance(item, RewardSpec):
        raise ConfigError(f"{where}={item!r} must be 'file.py:function', 'package.module:function' "
                          "or {function: ..., weight: ...}.")
    target, sep, name = item.function.rpartition(":")
    if not (sep and target and name.isidentifier()):
        raise ConfigError(f"{where}={item.function!r} must look like 'file.py:function' or "
                          "'package.module:function'.")
    if not math.isfinite(item.weight):
        raise ConfigError(f"{where}.weight={item.weight!r} must be a finite number.")
    return item


def _eval_set(name: Any, spec: Any) -> EvalSetConfig:
    """An evaluation.sets entry as written in YAML (a file name or a mapping) becomes a checked EvalSetConfig."""
    where = f"sets.{name}"  # build() puts "evaluation: " in front
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"sets: name {name!r} must be a word such as out_of_distribution "
                          "(letters, digits, underscores).")
    if isinstance(spec, str):
        spec = EvalSetConfig(path=spec)
    elif isinstance(spec, dict):
        spec = build(EvalSetConfig, spec, where)
    elif not isinstance(spec, EvalSetConfig):
        raise ConfigError(f"{where}={spec!r} must be a file name or {{path: FILE, metric: exact|json|contains}}.")
    if not spec.path:
        raise ConfigError(f"{where}: path is required (a .jsonl, .json or .csv file of chats with reference answers).")
    if spec.metric is not None and spec.metric not in METRICS:
        raise ConfigError(f"{where}.metric={spec.metric!r}: use one of {', '.join(METRICS)}.")
    return spec


def _section_type(kind: Any) -> type | None:
    """The dataclass a field holds (`Section` or an optional `Section | None`), else None."""
    if dataclasses.is_dataclass(kind):
        return kind
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
    sections = [o for o in options if dataclasses.is_dataclass(o)]
    return sections[0] if len(sections) == 1 and len(options) == 2 and type(None) in options else None


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
