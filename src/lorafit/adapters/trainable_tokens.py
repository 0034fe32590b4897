"""adapter.trainable_token_indices: train only some rows of an embedding (and of the head), as PEFT's TrainableTokens.

The rows are replacement values, not differences (PEFT names them `trainable_tokens_delta` all the same): they
start as copies of the base rows and the layer computes as if its weight held them in place of the base rows,
W' = W with W'[indices] = delta, which the base weight itself never does (it stays frozen and bit-identical).
- an embedding looks up the base rows and swaps in delta's rows where a token is one of `indices`;
- a head (a bias-free linear whose weight is tied to the embeddings, or one listed by name) computes the base
  logits and replaces the columns of `indices` by x · deltaᵀ.
Both give W' x exactly (the same products), without materialising W'. A tied head shares the embedding's delta
(PEFT ties it the same way and saves it once, under the embedding). Saved key:
`base_model.model.<module>.token_adapter.trainable_tokens_delta`, (len(indices), hidden) (io.py maps the names).

The forms PEFT accepts: a list of ids for the input embeddings, or a dict module-name -> ids (a module whose full
name ends with the key). Run files may name tokens by string too; `resolve_token_strings` turns them into ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.modules_to_save import modules_to_save_names
from lorafit.adapters.targets import describe_module_names, tied_embedding_names
from lorafit.config import AdapterConfig, ConfigError
from lorafit.models.frozen_16bit import trainable_dtype

DELTA = "trainable_tokens_delta"
SAVED_DELTA = f"token_adapter.{DELTA}"  # PEFT's key below the module name


class TrainableTokensError(ConfigError):
    """trainable_token_indices names no module, a module it cannot train, a token outside the vocabulary, or a
    module that modules_to_save trains in full."""


class TrainableTokens(nn.Module):
    """An embedding or head whose rows `token_indices` are replaced by trainable rows (see the module docstring);
    other attributes are the wrapped layer's.

    `tied_to`: the TrainableTokens of the embeddings this head shares its weight with; its delta is used (not owned,
    so it is neither a parameter here nor saved twice)."""

    def __init__(self, base_layer: nn.Module, indices: list[int], tied_to: TrainableTokens | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.disabled = False
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        weight = base_layer.weight
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.long, device=weight.device),
                             persistent=False)
        self._tied_to = [tied_to] if tied_to is not None else []  # a list: not a submodule, not in the state dict
        if tied_to is None:
            rows = weight.detach()[self.token_indices].to(trainable_dtype(base_layer))
            self.trainable_tokens_delta = nn.Parameter(rows.clone())
        if self.is_embedding:  # token id -> its row in delta, -1 for the others
            slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            slots[self.token_indices] = torch.arange(len(indices), device=weight.device)
            self.register_buffer("slots", slots, persistent=False)

    def __getattr__(self, name: str):
        """Attributes the wrapped layer has (in_features, num_embeddings, padding_idx, ...) read through."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    @property
    def delta(self) -> torch.Tensor:
        """The trained rows, (len(indices), hidden): this layer's own, or those of the embeddings it is tied to."""
        return self._tied_to[0].trainable_tokens_delta if self._tied_to else self.trainable_tokens_delta

    @property
    def owns_delta(self) -> bool:
        return not self._tied_to

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W' (a new tensor; for code that reads `.weight`, e.g. its dtype or device)."""
        return self.merged_weight().detach()

    def merged_weight(self) -> torch.Tensor:
        """W with its rows `indices` replaced by delta, in W's dtype."""
        weight = self.base_layer.weight
        return weight.index_copy(0, self.token_indices, self.delta.to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        delta = self.delta
        if self.is_embedding:  # x: token ids (...,) -> (..., hidden)
            slot = self.slots[x]
            rows = delta[slot.clamp(min=0)].to(out.dtype)
            scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale the rows too
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            return torch.where((slot >= 0).unsqueeze(-1), rows, out)
        logits = F.linear(x, delta.to(x.dtype))  # (..., n), in autocast's dtype when it is on
        return out.index_copy(-1, self.token_indices, logits.to(out.dtype))  # (..., vocab)


def token_layers(model: nn.Module) -> dict[str, TrainableTokens]:
    """Every TrainableTokens of the model by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TrainableTokens)}


def input_embeddings_name(model: nn.Module) -> str:
    """Full name of the model's input embeddings (PEFT's default target of a list of ids), else 'embed_tokens'."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return next((name for name, m in model.named_modules() if m is embeddings and name), "embed_tokens")


def plan_trainable_tokens(model: nn.Module, config: AdapterConfig,
                          full_modules: list[str]) -> list[tuple[str, list[int], str | None]]:
    """(module name, token ids, name of the layer it is tied to or None) for every layer to wrap, PEFT's way: a
    list of ids is for the input embeddings; a head tied to wrapped embeddings follows them (shares their rows)
    unless it is listed with other ids. Errors name the field and the fix."""
    by_key = config.token_indices_by_module(input_embeddings_name(model))
    names = [name for name, _ in model.named_modules() if name]
    plan: dict[str, list[int]] = {}
    for key, indices in by_key.items():
        if any(isinstance(i, str) for i in indices):
            raise TrainableTokensError(f"trainable_token_indices[{key!r}] holds token strings {indices!r}: pass the "
                                       "tokenizer (resolve_token_strings) or use token ids.")
        found = [name for name in names if name.endswith(key)]
        if not found:
            raise TrainableTokensError(f"trainable_token_indices key {key!r} matches no module of this model; "
                                       f"candidates: {describe_module_names(model)}.")
        for name in found:
            if name in full_modules:
                raise TrainableTokensError(
                    f"{name!r} is both in modules_to_save and in trainable_token_indices: a module is trained either "
                    "in full or by rows, not both (PEFT refuses it too); remove it from one of them.")
            _check_layer(model.get_submodule(name), name, indices)
            plan[name] = list(indices)
    tied = tied_embedding_names(model)
    embeddings = input_embeddings_name(model)
    result: list[tuple[str, list[int], str | None]] = [(n, i, None) for n, i in plan.items()]
    if embeddings in plan and embeddings in tied:
        for head in sorted(tied - {embeddings}):
            if head in full_modules:
                continue
            if head not in plan or plan[head] == plan[embeddings]:
                result = [r for r in result if r[0] != head] + [(head, plan[embeddings], embeddings)]
    return result


def wrap_trainable_tokens(model: nn.Module, plan: list[tuple[str, list[int], str | None]]) -> None:
    """Replace each planned layer by a TrainableTokens (owners first, then the heads tied to them)."""
    for name, indices, tied_to in sorted(plan, key=lambda item: item[2] is not None):
        source = model.get_submodule(tied_to) if tied_to else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TrainableTokens(parent.get_submodule(child), indices, tied_to=source))


def unwrap_trainable_tokens(model: nn.Module, merge: bool) -> None:
    """Put back each base layer, with its rows replaced by delta when `merge` (the tied head's weight is the
    embedding's, so writing the embedding's rows writes both)."""
    layers = token_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            if merge and layer.owns_delta:
                layer.base_layer.weight.index_copy_(0, layer.token_indices, layer.delta.to(layer.base_layer.weight.dtype))
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)


def resolve_token_strings(config: AdapterConfig, vocab: Mapping[str, int], where: str = "adapter") -> AdapterConfig:
    """config with every token string of trainable_token_indices replaced by its id in `vocab` (the tokenizer's
    get_vocab(), added tokens included); an unknown string is a ConfigError naming it."""
    if config.trainable_token_indices is None:
        return config

    def ids(key: str, tokens: list[Any]) -> list[int]:
        out = []
        for token in tokens:
            if isinstance(token, str):
                if token not in vocab:
                    raise TrainableTokensError(
                        f"{where}.trainable_token_indices{key}: token {token!r} is not in the tokenizer's vocabulary; "
                        "add it with data.added_tokens or use its id.")
                token = vocab[token]
            out.append(token)
        return out

    indices = config.trainable_token_indices
    resolved = ({k: ids(f"[{k!r}]", v) for k, v in indices.items()} if isinstance(indices, dict)
                else ids("", indices))
    return replace(config, trainable_token_indices=resolved)


def _check_layer(module: nn.Module, name: str, indices: list[int]) -> None:
    is_head = isinstance(module, nn.Linear)
    if not isinstance(module, nn.Embedding) and not (is_head and module.bias is None):
        raise TrainableTokensError(f"trainable_token_indices selects {name!r} ({type(module).__name__}): only an "
                                   "embedding or a bias-free output head can train single rows; name the embedding.")
    rows = module.weight.shape[0]
    if bad := [i for i in indices if not 0 <= i < rows]:
        raise TrainableTokensError(f"trainable_token_indices for {name!r}: token id {bad[0]} is outside its vocabulary "
                                   f"of {rows} rows (ids 0..{rows - 1}); add new tokens with data.added_tokens so the "
                                   "embeddings are resized first.")


def check_new_rows_trained(model: nn.Module, config: AdapterConfig, new_rows: range) -> None:
    """Embedding rows created for added tokens start at a placeholder and exist only in the adapter: each table that
    has them (the input embeddings, an untied head) must train them, by trainable_token_indices or modules_to_save;
    else a TrainableTokensError says what to add. Call before attach, with token strings resolved."""
    if not new_rows:
        return
    full = modules_to_save_names(model, config.modules_to_save or [])
    covered = {name: set(ids) for name, ids, _ in plan_trainable_tokens(model, config, full)}
    head = model.get_output_embeddings()
    tables = [input_embeddings_name(model)] + [name for name, m in model.named_modules()
                                                if m is head and name and name not in tied_embedding_names(model)]
    for table in tables:
        missing = [i for i in new_rows if i not in covered.get(table, set())]
        if table not in full and missing:
            leaf = table.rsplit(".", 1)[-1]
            where = f"{{..., {leaf}: [...]}}" if table != input_embeddings_name(model) else "[...]"
            raise TrainableTokensError(
                f"data.added_tokens: rows {missing} of {table!r} are new (placeholders) and would be neither trained "
                f"nor saved: list those tokens in adapter.trainable_token_indices {where}, or put {leaf!r} in "
                "adapter.modules_to_save.")
