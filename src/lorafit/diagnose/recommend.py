"""A starting config for a LoRA run from the data size, how far the task is from the base model, and a memory budget.

Rules (each choice carries its reason into the YAML as a comment):
- narrow shift (a format or style on familiar content): r 8 (under 1,000 examples) or 16, alpha 2r;
- moderate shift: r 16 / 32 / 64 as the data grows, rank-stabilised scaling (rsLoRA) from r 32;
- strong shift (new domain, vocabulary or language): r 64 or 128 with rsLoRA, a lower learning rate;
- a memory budget the 16-bit LoRA estimate exceeds: a 4-bit NF4 base, r 16-64, alpha 16-32, LoftQ init.
Adapters always target every linear layer; alpha is 16 or 32 (2r below r 16), whichever puts the
effective scale nearest 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.config import HEALTHY_SCALE, RSLORA_MIN_RANK, ConfigError, lora_scale, scale_rule
from lorafit.diagnose.memory import GB, MemoryEstimate, estimate_memory
from lorafit.diagnose.model_shape import ModelShape, model_shape

SHIFTS = ("narrow", "moderate", "strong")
TARGET_SCALE = 2.0  # alpha/r = 2 (alpha = 2r), the usual LoRA choice; rsLoRA keeps alpha/sqrt(r) there instead
WARMUP_FRACTION = 0.03  # QLoRA's warmup ratio
QLORA_RANKS = (16, 64)


@dataclass(frozen=True)
class Choice:
    """One recommended value and why."""

    value: Any
    reason: str


@dataclass
class Recommendation:
    """The recommended `adapter:` and `training:` sections (plus top-level keys such as quantize) with reasons."""

    model: str
    examples: int
    shift: str
    top: dict[str, Choice] = field(default_factory=dict)
    adapter: dict[str, Choice] = field(default_factory=dict)
    training: dict[str, Choice] = field(default_factory=dict)
    memory: MemoryEstimate | None = None
    memory_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The recommended values as plain data, shaped like a run YAML (no reasons)."""
        values = {key: choice.value for key, choice in self.top.items()}
        values["adapter"] = {key: choice.value for key, choice in self.adapter.items()}
        values["training"] = {key: choice.value for key, choice in self.training.items()}
        return values

    def to_yaml(self) -> str:
        """A YAML fragment for a run file: every key with a `# reason` comment; add `model:` and `data:` to run it."""
        budget = f", memory budget {self.memory_gb:g} GB" if self.memory_gb is not None else ""
        lines = [f"# lorafit recommend: {self.model}, {self.examples} examples, {self.shift} shift{budget}",
                 "# add `model:` and a `data:` section, then run `lorafit train RUN.yaml`"]
        if self.memory is not None:
            s = self.memory.settings
            lines.append(f"# estimated peak memory: {self.memory.total / GB:.1f} GB for {s['seq']}-token rows "
                         f"(data.max_seq_len: {s['seq']}); `lorafit estimate-memory` shows the details")
        lines += [_line(key, choice, "") for key, choice in self.top.items()]
        for section in ("adapter", "training"):
            lines.append(f"{section}:")
            lines += [_line(key, choice, "  ") for key, choice in getattr(self, section).items()]
        return "\n".join(lines) + "\n"


def recommend(
    model: str | Path | ModelShape,
    examples: int,
    shift: str = "moderate",
    memory_gb: float | None = None,
    *,
    seq_len: int = 1024,
) -> Recommendation:
    """Recommend adapter and training settings; with `memory_gb`, also 4-bit or not, micro-batch and checkpointing.

    model: a name or path `model_shape` reads (only read when memory_gb is given). examples: training examples.
    seq_len: tokens per row (data.max_seq_len) assumed by the memory estimate.
    """
    _check_inputs(examples, shift, memory_gb, seq_len)
    name = model.name if isinstance(model, ModelShape) else str(model)
    result = Recommendation(model=name, examples=examples, shift=shift, memory_gb=memory_gb)
    r, rank_reason = _rank(shift, examples)
    quantize = False
    if memory_gb is not None:
        shape = model if isinstance(model, ModelShape) else model_shape(model)
        lean = _estimate(shape, "lora", r, 1, seq_len, True)
        quantize = lean.total > memory_gb * GB
        if quantize:
            r = min(max(r, QLORA_RANKS[0]), QLORA_RANKS[1])
            rank_reason += f"; kept within {QLORA_RANKS[0]}-{QLORA_RANKS[1]} on a 4-bit base"
            result.top["quantize"] = Choice("nf4", f"16-bit LoRA needs {lean.total / GB:.1f} GB even at micro-batch 1 "
                                                   f"with checkpointing, over the {memory_gb:g} GB budget")
        result.top["dtype"] = Choice("bfloat16", "the memory estimate assumes a 16-bit base "
                                                 "(and 16-bit compute on the 4-bit one)")
    _adapter_choices(result, r, rank_reason, examples, quantize)
    _training_choices(result, shift, examples)
    if memory_gb is not None:
        _fit_memory(result, shape, r, seq_len, memory_gb, "qlora" if quantize else "lora")
    return result


def _rank(shift: str, examples: int) -> tuple[int, str]:
    if shift == "narrow":
        r = 8 if examples < 1000 else 16
        return r, f"narrow shift, {examples} examples: a small rank (8-16) is enough and overfits less"
    if shift == "moderate":
        r = 16 if examples < 2000 else 32 if examples < 20000 else 64
        return r, f"moderate shift, {examples} examples: rank 16-64, growing with the data"
    r = 64 if examples < 20000 else 128
    return r, f"strong shift, {examples} examples: a high rank (64-128) to learn much new"


def _alpha(r: int, use_rslora: bool) -> int:
    """2r below r=16; else 16 or 32, whichever puts the scale nearest TARGET_SCALE (the smaller on a tie)."""
    if r < 16:
        return 2 * r
    return min((16, 32), key=lambda alpha: (abs(math.log(lora_scale(alpha, r, use_rslora) / TARGET_SCALE)), alpha))


def _adapter_choices(result: Recommendation, r: int, rank_reason: str, examples: int, quantize: bool) -> None:
    use_rslora = r >= RSLORA_MIN_RANK
    alpha = _alpha(r, use_rslora)
    dropout = 0.05 if examples < 1000 else 0.0
    result.adapter = {
        "r": Choice(r, rank_reason),
        "alpha": Choice(alpha, f"effective scale {scale_rule(alpha, r, use_rslora)} = {lora_scale(alpha, r, use_rslora):.2f}, "
                               f"inside the {HEALTHY_SCALE[0]:g}-{HEALTHY_SCALE[1]:g} range where LoRA trains well"),
        "use_rslora": Choice(use_rslora, f"rank-stabilised scaling from r {RSLORA_MIN_RANK}: alpha/r would shrink "
                                         "updates as r grows" if use_rslora else
                             f"below r {RSLORA_MIN_RANK} plain alpha/r scaling is fine"),
        "target_modules": Choice("all-linear", "every linear layer of each block (not the head): attention-only "
                                               "adapters learn formats but little new knowledge (QLoRA paper)"),
        "dropout": Choice(dropout, "a light regulariser on little data" if dropout else
                          "enough data that dropout would only slow learning"),
        "use_dora": Choice(False, "plain LoRA first; try DoRA if the loss plateaus early (it costs a weight norm "
                                  "per adapted layer each step)"),
        "init": Choice("loftq", "on a 4-bit base, LoftQ starts A and B as a rank-r fit of the quantisation error "
                                "W - NF4(W); costs one SVD per layer at the start") if quantize else
        Choice("default", "B = 0, so training starts from the base model exactly"),
    }


def _training_choices(result: Recommendation, shift: str, examples: int) -> None:
    lr = 1e-4 if shift == "strong" else 2e-4
    epochs = 3 if examples < 1000 else 2 if examples < 10000 else 1
    batch_size = 16 if examples >= 500 else 8
    steps = math.ceil(examples / batch_size) * epochs
    warmup = round(WARMUP_FRACTION * steps)
    result.training = {
        "lr": Choice(lr, "half the usual 2e-4: high-rank rsLoRA adapters take larger steps" if shift == "strong" else
                     "the usual LoRA learning rate (QLoRA paper, 7-13B models)"),
        "epochs": Choice(epochs, f"{examples} examples: more passes over small data, one over large data"),
        "batch_size": Choice(batch_size, "rows per optimiser step" + ("" if batch_size == 16 else
                                                                      "; smaller on little data for more steps")),
        "warmup_steps": Choice(warmup, f"{WARMUP_FRACTION:.0%} of about {steps} steps (packing makes fewer rows, "
                                       "so fewer steps)"),
        "schedule": Choice("cosine", "decays to 0 by the last step"),
        "weight_decay": Choice(0.0, "adapters start at B = 0; decay would pull them back toward the base"),
    }


def _fit_memory(result: Recommendation, shape: ModelShape, r: int, seq_len: int, memory_gb: float, method: str) -> None:
    """The largest micro-batch (a power of two dividing batch_size) that fits, without checkpointing if possible."""
    batch_size = result.training["batch_size"].value
    micros = [m for m in (2 ** k for k in range(batch_size.bit_length())) if batch_size % m == 0][::-1]
    for checkpointing in (False, True):
        for micro in micros:
            estimate = _estimate(shape, method, r, micro, seq_len, checkpointing)
            if estimate.total <= memory_gb * GB:
                result.memory = estimate
                result.training["micro_batch_size"] = Choice(
                    micro, f"{micro} x {seq_len}-token rows per forward pass: {estimate.total / GB:.1f} GB "
                           f"estimated, within {memory_gb:g} GB")
                result.training["gradient_checkpointing"] = Choice(
                    checkpointing, "needed to fit the budget (recomputes each block: ~30% slower)" if checkpointing
                    else "not needed to fit the budget")
                return
    raise ConfigError(
        f"memory_gb={memory_gb:g}: even {method} at micro-batch 1 with gradient checkpointing needs "
        f"{estimate.total / GB:.1f} GB for {seq_len}-token rows; shorten data.max_seq_len (seq_len) or pick a smaller model."
    )


def _estimate(shape: ModelShape, method: str, r: int, micro: int, seq_len: int, checkpointing: bool) -> MemoryEstimate:
    """lorafit's setting: bf16 compute, AdamW, all linear layers, packed rows (attention with a mask)."""
    return estimate_memory(shape, method, r=r, batch=micro, seq=seq_len, grad_checkpointing=checkpointing,
                           precision="bf16", optimizer="adamw", targets="all-linear", attention_mask=True)


def _line(key: str, choice: Choice, indent: str) -> str:
    return f"{indent}{key}: {json.dumps(choice.value)}  # {choice.reason}"


def _check_inputs(examples: int, shift: str, memory_gb: float | None, seq_len: int) -> None:
    if shift not in SHIFTS:
        raise ConfigError(f"shift={shift!r} is unknown: use one of {', '.join(SHIFTS)}.")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
        raise ConfigError(f"examples={examples!r} is invalid: give the number of training examples (a positive integer).")
    if memory_gb is not None and not memory_gb > 0:
        raise ConfigError(f"memory_gb={memory_gb!r} is invalid: give the accelerator's memory in GB, e.g. 24.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"seq_len={seq_len!r} is invalid: use a positive integer (data.max_seq_len).")
