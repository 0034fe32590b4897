"""training.compile: torch.compile each decoder block in place, or say why not and stay eager.

Blocks are compiled with nn.Module.compile() (in place), so parameter names, state dicts, saved adapters and
checkpoints are the same as without compiling. The first step pays the compile time (tens of seconds per distinct
block input shape); later steps run the compiled kernels. Whether it pays depends on the device and the shapes:
benchmarks/compile_speed.py measures it; on CPU the default is off.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder blocks: the ModuleList with one entry per config.num_hidden_layers, or None."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers), None)


def compiler_problem() -> str | None:
    """Why torch.compile cannot work here (a trial compile of a two-op function fails), or None when it works."""
    try:
        trial = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
        trial(torch.ones(4))
    except Exception as err:  # noqa: BLE001 - any failure means "no working compiler"; its text is the reason
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def compile_blocks(model: nn.Module) -> bool:
    """Compile every decoder block of `model` in place; True when done. When no compiler works or the blocks
    cannot be found, warn with the reason and leave the model eager (False): training runs, only slower."""
    blocks = decoder_blocks(model)
    problem = compiler_problem() if blocks is not None else "no list of decoder blocks found in the model"
    if problem:
        warnings.warn(f"training.compile: running eager, torch.compile is unavailable here ({problem})",
                      stacklevel=2)
        return False
    for block in blocks:
        block.compile()
    return True
