"""What autograd keeps for backward: the bytes of the distinct storages a computation saves."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_storage_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (views of one storage count once)."""
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.untyped_storage().nbytes() for t in kept.values())
