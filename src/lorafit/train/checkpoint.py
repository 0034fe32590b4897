"""Checkpoint contents: adapter (PEFT format) + optimiser, scheduler, RNG and data position, written atomically.

Where checkpoints live, their step-N names, listing and pruning belong to the run folder (lorafit.run_dir).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.adapters.io import load_adapter_weights, save_adapter
from lorafit.fileio import atomic_directory
from lorafit.run_dir import CHECKPOINT_COMPLETE, RunDir

STATE_FILE = CHECKPOINT_COMPLETE  # the run folder counts a checkpoint as complete once this file is in it


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the folder."""


@dataclass
class TrainerState:
    """Where training stands: optimiser steps done and tokens seen (the data position follows from the step)."""

    step: int = 0
    tokens_seen: int = 0


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainerState, keep: int) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep`."""
    run = RunDir(run_dir)
    target = run.checkpoint_path(state.step)
    with atomic_directory(target) as tmp:
        save_adapter(model, tmp / "adapter", convert_pissa=False)  # resume needs the residual form
        torch.save({
            "trainer": vars(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        }, tmp / STATE_FILE)
    run.prune_checkpoints(keep)
    return target


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore adapter weights, optimiser, scheduler and RNG from a checkpoint folder; return the trainer state."""
    try:
        saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        load_adapter_weights(model, path / "adapter")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot resume from {path}: {err}. Delete that folder to resume from an older one.") from err
    _set_rng_state(saved["rng"])
    return TrainerState(**saved["trainer"])


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
