"""Which modules get adapters: all-linear (never the output head), attention, mlp, names or a regex."""

from __future__ import annotations

import re
from collections import Counter

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.config import ConfigError
from lorafit.quant.linear4bit import Linear4bit

ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "feed_forward", "ffn")


class TargetError(ConfigError):
    """target_modules matched nothing, or matched a module that cannot carry an adapter."""


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types an adapter can wrap: nn.Linear (and subclasses), GPT-2's Conv1D, 4-bit Linear4bit."""
    return isinstance(module, (nn.Linear, Conv1D, Linear4bit))


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (lm_head), found by identity, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def tied_embedding_names(model: nn.Module) -> set[str]:
    """Full names of the input embeddings and the output head when they share one weight (tied), else empty."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return set()
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is None or head is None or getattr(embeddings, "weight", None) is not getattr(head, "weight", 0):
        return set()
    return {name for name, m in model.named_modules() if m is embeddings or m is head}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable layer of the model except the output head, by full module name."""
    head = output_head(model)
    return {name: m for name, m in model.named_modules() if is_adaptable(m) and m is not head}


def select_targets(
    model: nn.Module, target_modules: str | list[str], exclude_modules: str | list[str] | None = None
) -> list[str]:
    """Full names of the modules to adapt; raises TargetError naming what the model does have."""
    if isinstance(target_modules, str) and target_modules in ("all-linear", "attention", "mlp"):
        candidates = linear_layers(model)
        if target_modules != "all-linear":
            words = ATTENTION_WORDS if target_modules == "attention" else MLP_WORDS
            candidates = {n: m for n, m in candidates.items() if _in_block_of(n, words)}
        chosen = list(candidates)
    else:
        chosen = [name for name, _ in model.named_modules() if name and name_matches(name, target_modules)]
        unsupported = [n for n in chosen if not is_adaptable(model.get_submodule(n))]
        if unsupported:
            kinds = sorted({type(model.get_submodule(n)).__name__ for n in unsupported})
            raise TargetError(
                f"target_modules={target_modules!r} matches {unsupported[0]!r} ({', '.join(kinds)}), which is not a "
                f"linear layer; adapters wrap nn.Linear, Conv1D and Linear4bit only. {describe_linear_layers(model)}"
            )
    if exclude_modules is not None:
        chosen = [n for n in chosen if not name_matches(n, exclude_modules)]
    if not chosen:
        raise TargetError(f"target_modules={target_modules!r} matches no layer of this model. {describe_linear_layers(model)}")
    return chosen


def name_matches(name: str, pattern: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches the name or a dotted suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def minimal_suffixes(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest dotted name suffixes that select exactly `targets` under PEFT's list rule (for adapter_config.json)."""
    target_set = set(targets)
    others = [n for n, _ in model.named_modules() if n and n not in target_set]
    suffixes: set[str] = set()
    for name in targets:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                suffixes.add(suffix)
                break
    return sorted(suffixes)


def describe_linear_layers(model: nn.Module) -> str:
    """A short description of the model's linear layers, for error messages."""
    names = list(linear_layers(model))
    if not names:
        return "The model has no nn.Linear or Conv1D layers."
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    kinds = ", ".join(f"{leaf} (x{c})" for leaf, c in sorted(counts.items()))
    return f"Its linear layers are: {kinds}; e.g. {names[0]!r}. Use 'all-linear', 'attention', 'mlp', those names, or a regex."


def describe_module_names(model: nn.Module) -> str:
    """The distinct last parts of the model's leaf module names (embed_tokens, lm_head, q_proj, ...), for errors."""
    leaves = dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                           if name and not list(m.children()) and not name.rsplit(".", 1)[-1].isdigit())
    return ", ".join(leaves)


def _in_block_of(name: str, words: tuple[str, ...]) -> bool:
    parents = name.lower().split(".")[:-1]
    return any(word in part for part in parents for word in words)
