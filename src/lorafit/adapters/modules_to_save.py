"""adapter.modules_to_save: whole modules (embeddings, output head, a classifier `score`) trained in full.

As PEFT's ModulesToSaveWrapper: the listed module is replaced by a wrapper holding the frozen original (used while
the adapter is disabled: the reference policy, `adapters_disabled`) and a trainable copy (used otherwise). The copy
is saved as `base_model.model.<module>.<param>` (PEFT's layout, io.py maps the names). Matching is PEFT's: every
module whose full name ends with an entry. LoRA never adapts a module inside a saved one (PEFT excludes them too).

Tied embeddings: each listed module gets its own copy, so training unties the input embeddings and the head, as
PEFT does without `ensure_weight_tying` (which lorafit does not implement); merge_and_unload then marks the model
untied. A 16-bit embedding or head kept frozen under QLoRA (models/frozen_16bit.py) is copied in its compute
dtype (fp32): the trainable copy, its gradient and its optimizer state are full precision.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from lorafit.adapters.targets import describe_module_names, tied_embedding_names
from lorafit.config import ConfigError, LorafitWarning
from lorafit.models.frozen_16bit import (
    Frozen16bitEmbedding,
    Frozen16bitLinear,
    trainable_dtype,
)
from lorafit.quant.linear4bit import Linear4bit

COPY_ATTR = "trained_copy"  # the wrapper's child that holds the trainable copy


class ModulesToSaveError(ConfigError):
    """modules_to_save names no module, a module that cannot be copied, or modules nested in each other."""


class ModuleToSave(nn.Module):
    """A frozen module (`original_module`) and its trainable copy (`trained_copy`); forward uses the copy unless
    `disabled`. Attribute reads that transformers makes on the module (weight, num_embeddings, ...) see the copy."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.trained_copy = trainable_copy(original).requires_grad_(True)
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disabled else self.trained_copy)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__(COPY_ATTR), name)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of `module`: a kept-16-bit embedding / head becomes a plain nn.Embedding / nn.Linear in its
    compute dtype; anything else is deep-copied as it is (its own dtype, as PEFT)."""
    if isinstance(module, Frozen16bitEmbedding):
        dtype = trainable_dtype(module)
        plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                             max_norm=module.max_norm, norm_type=module.norm_type,
                             scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
                             device=module.weight.device, dtype=dtype)
    elif isinstance(module, Frozen16bitLinear):
        dtype = trainable_dtype(module)
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device=module.weight.device,
                          dtype=dtype)
    else:
        return copy.deepcopy(module)
    with torch.no_grad():
        plain.weight.copy_(module.weight)
    return plain


def modules_to_save_names(model: nn.Module, entries: Iterable[str]) -> list[str]:
    """Full names of the modules `entries` select (PEFT: the name ends with an entry); an entry that selects nothing,
    a 4-bit layer or a module inside another selected one is a ModulesToSaveError naming the candidates."""
    names = [name for name, _ in model.named_modules() if name]
    chosen: list[str] = []
    for entry in entries:
        found = [name for name in names if name.endswith(entry)]
        if not found:
            raise ModulesToSaveError(f"modules_to_save entry {entry!r} matches no module of this model; candidates: "
                                     f"{describe_module_names(model)} (an entry matches a module whose name ends with it).")
        chosen += [name for name in found if name not in chosen]
    for name in chosen:
        if isinstance(model.get_submodule(name), Linear4bit):
            raise ModulesToSaveError(f"modules_to_save selects {name!r}, a 4-bit layer: a full copy of a quantised "
                                     "layer is not supported; adapt it with target_modules instead.")
        if outer := next((o for o in chosen if name.startswith(o + ".")), None):
            raise ModulesToSaveError(f"modules_to_save selects {name!r} inside {outer!r}: list only the outer module.")
    return chosen


def present_entries(model: nn.Module, entries: list[str] | None) -> list[str] | None:
    """The entries of a saved config's modules_to_save that match a module of `model` (None if none): PEFT skips the
    others when it loads (its SEQ_CLS adapters list both 'classifier' and 'score', whichever the model has)."""
    names = [name for name, _ in model.named_modules() if name]
    present = [entry for entry in entries or [] if any(name.endswith(entry) for name in names)]
    return present or None


def wrap_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Replace each named module by a ModuleToSave (frozen original + trainable copy); warn as PEFT does when a
    tied embedding or head is among them (the copies train apart)."""
    tied = tied_embedding_names(model)
    if tied and any(name in tied for name in names):
        warnings.warn(f"modules_to_save includes {', '.join(n for n in names if n in tied)}, whose weight is tied "
                      f"({' = '.join(sorted(tied))}); each gets its own trainable copy, so the trained model's input "
                      "embeddings and head are no longer tied (as PEFT without ensure_weight_tying).",
                      LorafitWarning, stacklevel=3)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ModuleToSave(parent.get_submodule(child)))


def modules_to_save(model: nn.Module) -> dict[str, ModuleToSave]:
    """Every ModuleToSave of the model by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModuleToSave)}


def unwrap_modules_to_save(model: nn.Module, keep_trained: bool, dtype: torch.dtype | None = None) -> None:
    """Put back the trained copies (keep_trained, in `dtype` when given) or the originals; a model whose input
    embeddings and head were tied is marked untied when a trained copy replaces one of them."""
    for name, wrapper in modules_to_save(model).items():
        module = wrapper.trained_copy if keep_trained else wrapper.original_module
        if keep_trained:
            module.requires_grad_(False)
            if dtype is not None and module.weight.dtype != dtype:
                module.to(dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    config = getattr(model, "config", None)
    if keep_trained and getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None \
            and not tied_embedding_names(model):
        config.tie_word_embeddings = False

