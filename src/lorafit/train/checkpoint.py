"""Checkpoint contents: adapter (PEFT format) + optimiser, scheduler, RNG and trainer state, without pickle.

A checkpoint folder holds
  adapter/               the adapter in residual form (safetensors + adapter_config.json)
  optimizer.json/.safetensors, scheduler.json, rng.json/.safetensors, trainer_state.json
  early_stopping.json/.safetensors  with evaluation.early_stopping: the rule's state and the best adapter
  manifest.json          size + SHA-256 of each file above, written last (checkpoint_format owns the layout)
and is written to a temporary folder, fsynced and renamed (fileio.atomic_directory). Resuming reads and
verifies everything into memory first (`read_checkpoint`), then restores it (`restore_checkpoint`), so a
damaged checkpoint is refused before any model or optimiser state changes and an older one can be tried
instead (`newest_valid_checkpoint`). Pickled checkpoints of earlier versions (trainer_state.pt) can run code
when loaded; they are read only when the user says they trust them.
Where checkpoints live, their step-N names, listing and pruning belong to the run folder (lorafit.run_dir).

The same files for 1 or N processes (lorafit.distributed): the adapter gathered from every rank's shards and
the optimizer state keyed by parameter name with full tensors, so a checkpoint resumes on any number of
processes and with either strategy. Every rank gathers (a collective); rank 0 alone writes. Resuming loads the
adapter into the model before it is wrapped (restore_adapter) and the optimizer state after the optimizer is
built over the wrapped model's parameters (restore_training_state).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit import distributed
from lorafit.adapters.io import AdapterFileError, load_adapter_tensors, read_adapter_weights, save_adapter
from lorafit.errors import CheckpointError
from lorafit.fileio import atomic_directory, write_json_atomic
from lorafit.run_dir import CHECKPOINT_MANIFEST as MANIFEST
from lorafit.run_dir import LEGACY_CHECKPOINT_STATE as LEGACY_STATE_FILE
from lorafit.run_dir import RunDir
from lorafit.train.checkpoint_format import (
    check_finite,
    listed_files,
    read_json,
    read_state,
    verify_manifest,
    write_manifest,
    write_state,
)
from lorafit.train.early_stopping import EarlyStoppingState

ADAPTER_DIR = "adapter"
TRAINER_FILE = "trainer_state.json"
EARLY_STOPPING = "early_stopping"  # early_stopping.json (+ .safetensors: the best adapter)
_REQUIRED = [f"{ADAPTER_DIR}/adapter_model.safetensors", f"{ADAPTER_DIR}/adapter_config.json", "optimizer.json",
             "scheduler.json", "rng.json", "rng.safetensors", TRAINER_FILE]

__all__ = ["CheckpointError", "CheckpointContents", "TrainerState", "gather_training_state", "load_checkpoint",
           "newest_valid_checkpoint", "read_checkpoint", "restore_adapter", "restore_checkpoint",
           "restore_training_state", "save_checkpoint", "write_checkpoint"]


@dataclass
class TrainerState:
    """Where training stands: optimiser steps done and tokens seen (the data position follows from the step);
    with evaluation.early_stopping, the rule's state and the adapter of its best evaluation (parameter name ->
    full CPU tensor, as distributed.gather_adapter gives it: on rank 0; None on the other ranks)."""

    step: int = 0
    tokens_seen: int = 0
    early_stopping: EarlyStoppingState | None = None
    best_adapter: dict[str, torch.Tensor] | None = None


@dataclass
class CheckpointContents:
    """A checkpoint read and verified in memory, not yet applied to a model."""

    path: Path
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    trainer: TrainerState


def save_checkpoint(run_dir: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainerState, keep: int) -> Path:
    """Write the run folder's checkpoint of step state.step atomically, then delete all but the newest `keep`.

    Every rank must call it: each gathers (gather_training_state); rank 0 writes and prunes while the others
    wait, so no rank goes on before the checkpoint is complete."""
    run = RunDir(run_dir)
    target = run.checkpoint_path(state.step)
    adapter, optimizer_state = gather_training_state(wrapped, optimizer)
    if distributed.is_main():
        write_checkpoint(target, distributed.unwrap(wrapped), adapter, optimizer_state, scheduler, state)
        run.prune_checkpoints(keep)
    distributed.barrier()
    return target


def gather_training_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """(adapter parameters by name, optimizer state by parameter name), full tensors on the CPU, on rank 0;
    (None, None) on the others. A collective: every rank calls it."""
    return distributed.gather_adapter(wrapped), distributed.full_optimizer_state(wrapped, optimizer)


def write_checkpoint(target: Path, model: nn.Module, adapter: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                     scheduler: Any, state: TrainerState) -> Path:
    """Write a checkpoint folder at `target` atomically: every file, then the manifest, fsync, rename.

    model: the unwrapped model (its adapter config); adapter and optimizer_state as gather_training_state gives
    them on rank 0."""
    with atomic_directory(target) as tmp:
        save_adapter(model, tmp / ADAPTER_DIR, convert_pissa=False, parameters=adapter)  # resume: residual form
        write_state(tmp, "optimizer", optimizer_state)
        write_state(tmp, "scheduler", scheduler.state_dict())
        write_state(tmp, "rng", _rng_state())
        write_json_atomic(tmp / TRAINER_FILE, {"step": state.step, "tokens_seen": state.tokens_seen})
        if state.early_stopping is not None:
            write_state(tmp, EARLY_STOPPING, _early_stopping_tree(state))
        write_manifest(tmp)
    return target


def read_checkpoint(path: Path, *, trust_checkpoint: bool = False) -> CheckpointContents:
    """Read and verify a checkpoint folder (manifest sizes and hashes, finite tensors) without changing anything.

    A pickled checkpoint of an earlier lorafit (trainer_state.pt, no manifest) is refused: unpickling runs any
    code the file holds. With trust_checkpoint=True (`--trust-checkpoint`) it is read with a warning.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() and (path / LEGACY_STATE_FILE).is_file():
        return _read_legacy(path, trust_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist.")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path / MANIFEST} is missing: {path} is no complete lorafit checkpoint; resume from "
                              "an older one or delete it.")
    verify_manifest(path, _REQUIRED)
    trainer = read_json(path / TRAINER_FILE)
    if not isinstance(trainer, dict) or set(trainer) != {"step", "tokens_seen"} \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in trainer.values()):
        raise CheckpointError(f"{path / TRAINER_FILE} must hold integers 'step' and 'tokens_seen', not {trainer!r}.")
    if f"{EARLY_STOPPING}.json" in listed_files(path):
        trainer |= _read_early_stopping(path)
    return CheckpointContents(path=path, adapter=_read_adapter(path), optimizer=read_state(path, "optimizer"),
                              scheduler=read_state(path, "scheduler"), rng=read_state(path, "rng"),
                              trainer=TrainerState(**trainer))


def restore_checkpoint(saved: CheckpointContents, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> TrainerState:
    """Put a read checkpoint into an unwrapped model, its optimiser, scheduler and the RNGs (one process);
    return the trainer state. A trainer that wraps the model calls the two halves around the wrap."""
    restore_adapter(saved, model)
    return restore_training_state(saved, model, optimizer, scheduler)


def restore_adapter(saved: CheckpointContents, model: nn.Module) -> None:
    """Copy the checkpoint's adapter into the model, before it is wrapped for several processes (FSDP2 replaces
    the parameters by shards; DDP and FSDP2 then start every rank from rank 0's values)."""
    _fits(saved, lambda: load_adapter_tensors(model, saved.adapter, saved.path / ADAPTER_DIR))


def restore_training_state(saved: CheckpointContents, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any) -> TrainerState:
    """Load optimiser (each rank keeps its shard), scheduler and RNG state, after the optimiser was built over the
    wrapped model's parameters; return the trainer state. Every rank must call it.

    A checkpoint that does not fit this run (other adapter shape, parameter count or schedule) is a
    CheckpointError: resuming it would silently train something else.
    """
    _check_scheduler_state(saved, scheduler)
    state = _by_name(saved.optimizer, distributed.unwrap(wrapped), optimizer)
    _fits(saved, lambda: distributed.load_full_optimizer_state(wrapped, optimizer, state))
    _fits(saved, lambda: scheduler.load_state_dict(saved.scheduler))
    _set_rng_state(saved.rng)
    return replace(saved.trainer)


def _fits(saved: CheckpointContents, load: Any) -> None:
    try:
        load()
    except (ValueError, KeyError) as err:  # AdapterFileError and ConfigError are ValueErrors
        raise CheckpointError(f"{saved.path} does not fit this run ({err}); resume with the settings that wrote it, "
                              "or start a new run in another output_dir.") from err


def _by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name. Checkpoints of lorafit before multi-process training key it
    by position (optimizer.state_dict()); positions follow the optimizer's parameters, named from the model."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not groups or not all(isinstance(i, int) for g in groups for i in g.get("params", [])):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    positions = [i for g in groups for i in g["params"]]
    if len(positions) != len(ordered):
        raise CheckpointError(f"the optimizer state holds {len(positions)} parameters but this run trains "
                              f"{len(ordered)}; resume with the settings that wrote it.")
    rename = dict(zip(positions, ordered))
    return {"state": {rename[i]: s for i, s in state.get("state", {}).items()},
            "param_groups": [dict(g, params=[rename[i] for i in g["params"]]) for g in groups]}


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                    trust_checkpoint: bool = False) -> TrainerState:
    """read_checkpoint + restore_checkpoint of one folder."""
    return restore_checkpoint(read_checkpoint(path, trust_checkpoint=trust_checkpoint), model, optimizer, scheduler)


def newest_valid_checkpoint(checkpoints: list[Path], *, trust_checkpoint: bool = False) -> CheckpointContents | None:
    """The newest of `checkpoints` (oldest first, as listed) that reads and verifies; each one that fails is
    skipped with a warning naming the bad file. None when the list is empty; a CheckpointError (the newest one's
    reason) when none is usable, rather than silently starting over."""
    failures: list[CheckpointError] = []
    for path in reversed(checkpoints):
        try:
            saved = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
            failures.append(err)
            continue
        if failures:
            warnings.warn(f"resuming from the older checkpoint {path}", stacklevel=2)
        return saved
    if failures:
        more = f" (and {len(failures) - 1} older checkpoints failed too)" if len(failures) > 1 else ""
        raise CheckpointError(f"{failures[0]}{more}")
    return None


def _early_stopping_tree(state: TrainerState) -> dict[str, Any]:
    """The state tree stored as early_stopping.json/.safetensors: the rule's fields and the best adapter's tensors
    (an empty mapping before the first evaluation)."""
    rule = state.early_stopping
    return {"monitor": rule.monitor, "best": rule.best, "best_step": rule.best_step,
            "evaluations_without_improvement": rule.evaluations_without_improvement,
            "best_adapter": state.best_adapter or {}}


def _read_early_stopping(path: Path) -> dict[str, Any]:
    """TrainerState's early_stopping and best_adapter fields from the checkpoint's early_stopping files; a tree
    of other fields or types is a CheckpointError (the file was edited)."""
    tree = read_state(path, EARLY_STOPPING)
    fields = {"monitor", "best", "best_step", "evaluations_without_improvement", "best_adapter"}
    if not isinstance(tree, dict) or set(tree) != fields:
        raise CheckpointError(f"{path / EARLY_STOPPING}.json must hold {', '.join(sorted(fields))}; the file was "
                              "edited: resume from another checkpoint.")
    best, best_step, stale, adapter = (tree[k] for k in ("best", "best_step", "evaluations_without_improvement",
                                                           "best_adapter"))
    valid = (isinstance(tree["monitor"], str) and _is_int(stale) and stale >= 0 and isinstance(adapter, dict)
             and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in adapter.items())
             and ((best is None and best_step is None and not adapter)
                  or (isinstance(best, float) and math.isfinite(best) and _is_int(best_step) and adapter)))
    if not valid:
        raise CheckpointError(f"{path / EARLY_STOPPING}.json holds no valid early-stopping state ({tree['monitor']!r}, "
                              f"best {best!r} at step {best_step!r}, {stale!r} evaluations without improvement, "
                              f"{len(adapter) if isinstance(adapter, dict) else adapter!r} best-adapter tensors); "
                              "resume from another checkpoint.")
    rule = EarlyStoppingState(monitor=tree["monitor"], best=best, best_step=best_step,
                              evaluations_without_improvement=stale)
    return {"early_stopping": rule, "best_adapter": adapter or None}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_adapter(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_adapter_weights(path / ADAPTER_DIR)
    except AdapterFileError as err:
        raise CheckpointError(f"{err}; resume from an older checkpoint.") from err


def _tensors_in(tree: Any, where: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor inside a state tree, for error messages that name the tensor."""
    if isinstance(tree, torch.Tensor):
        return [(where, tree)]
    if isinstance(tree, dict):
        return [found for k, v in tree.items() for found in _tensors_in(v, f"{where}/{k}" if where else str(k))]
    if isinstance(tree, (list, tuple)):
        return [found for i, v in enumerate(tree) for found in _tensors_in(v, f"{where}/{i}" if where else str(i))]
    return []


def _check_scheduler_state(saved: CheckpointContents, scheduler: Any) -> None:
    """The saved scheduler state only sets data fields (LambdaLR.load_state_dict sets whatever it is given as
    attributes: an edited scheduler.json must not replace the optimizer or a method), and the learning-rate
    schedule settings saved with it (LrSchedule) equal this run's. Fields of other torch versions are allowed."""
    if not isinstance(saved.scheduler, dict) or "lr_lambdas" not in saved.scheduler:
        raise CheckpointError(f"{saved.path / 'scheduler.json'} is not a learning-rate scheduler state; resume from "
                              "another checkpoint or start a new run.")
    for key in saved.scheduler:
        data_field = isinstance(key, str) and key != "optimizer" and not key.startswith("__") \
            and not callable(getattr(scheduler, key, None))
        if not data_field:
            raise CheckpointError(f"{saved.path / 'scheduler.json'}: field {key!r} is no scheduler state; the file "
                                  "was edited: resume from another checkpoint.")
    current = scheduler.state_dict().get("lr_lambdas") or []
    for before, now in zip(saved.scheduler.get("lr_lambdas") or [], current):
        if before is not None and now is not None and before != now:
            raise CheckpointError(f"{saved.path / 'scheduler.json'}: the checkpoint's learning-rate schedule {before} "
                                  f"differs from this run's {now}; resume with the same training settings "
                                  "(max_steps, epochs, warmup_steps, schedule) or start a new run.")


def _read_legacy(path: Path, trust_checkpoint: bool) -> CheckpointContents:
    """A pickled checkpoint of lorafit before format version 1; only when the user trusts it."""
    if not trust_checkpoint:
        raise CheckpointError(
            f"{path / LEGACY_STATE_FILE} is a pickled checkpoint from an earlier lorafit version; loading a pickle "
            "can run any code it holds, so lorafit refuses it. If you wrote it yourself, resume with "
            "--trust-checkpoint (load_checkpoint(..., trust_checkpoint=True)); otherwise delete the folder.")
    warnings.warn(f"reading the pickled checkpoint {path / LEGACY_STATE_FILE} because trust_checkpoint is set: "
                  "it can run code; the next checkpoint is written without pickle.", stacklevel=3)
    try:
        saved = torch.load(path / LEGACY_STATE_FILE, map_location="cpu", weights_only=False)  # trusted by the user
        contents = CheckpointContents(path=path, adapter=_read_adapter(path), optimizer=saved["optimizer"],
                                      scheduler=saved["scheduler"], rng=saved["rng"],
                                      trainer=TrainerState(**saved["trainer"]))
    except (OSError, KeyError, TypeError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path / LEGACY_STATE_FILE} cannot be read ({type(err).__name__}: {err}); "
                              "resume from an older checkpoint.") from err
    for key, tensor in _tensors_in(contents.optimizer):
        check_finite({key: tensor}, path / LEGACY_STATE_FILE)
    return contents


def _rng_state() -> dict[str, Any]:
    """torch CPU (a uint8 tensor), CUDA (one per device, when present) and Python `random` state."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the RNG state of the checkpoint cannot be restored ({type(err).__name__}: {err}); "
                              "resume from an older checkpoint.") from err
