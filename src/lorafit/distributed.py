"""Multi-process training on torch.distributed (launched by torchrun); the only lorafit module that imports it.

One code path for 1 or N processes: without torchrun's environment the world is one process, no process
group exists, and every function here does the world-size-1 thing (share = all rows, all-reduce = identity,
wrap = no DDP/FSDP, gather = the model's own tensors).

What a trainer does, on every rank:

    context = distributed.init()                        # reads RANK, WORLD_SIZE, LOCAL_RANK (torchrun)
    model = ... load base, attach adapter (same seed on every rank) ...
    wrapped = distributed.wrap(model, "ddp" | "fsdp")   # adapters' initial values are rank 0's
    for step ...:
        rows = step_rows(...)                           # the global step's rows, identical on every rank
        batches = rank_micro_batches(rows, ..., rank=context.rank, world_size=context.world_size)
        targets = distributed.all_reduce_sum(sum(b.targets for b in batches))
        for b in batches:                               # the same count of micro-batches on every rank
            loss = wrapped(target_loss_sum, b.tensors)  # fn(model, batch) runs inside the wrapper's hooks
            (loss * distributed.gradient_scale(targets)).backward()
        distributed.clip_grad_norm(model.parameters(), max_norm); optimizer.step(); optimizer.zero_grad()
        logged_loss = distributed.all_reduce_sum(sum of loss.item()) / targets
    distributed.save_adapter(wrapped, path)             # every rank gathers; rank 0 writes
    distributed.shutdown()
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from lorafit.adapters import io as adapter_io
from lorafit.config import ConfigError

STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_MINUTES = 30.0
TIMEOUT_HINT = "set distributed.timeout_minutes in the run config"
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world size, the device it trains on and the backend (None: no group)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    timeout_minutes: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context: Context | None = None


def init(*, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, cpu_offload: bool = False,
         init_method: str = "env://") -> Context:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); idempotent.

    Backend: NCCL on CUDA (device cuda:LOCAL_RANK; with FSDP CPU offload also gloo for the CPU-side tensors),
    gloo on CPU. A collective that waits longer than `timeout_minutes` (a rank died or hangs) fails on every
    rank instead of hanging the job. WORLD_SIZE unset or 1: no process group, rank 0 of a world of 1.
    """
    global _context
    if _context is not None:
        return _context
    if not (isinstance(timeout_minutes, (int, float)) and not isinstance(timeout_minutes, bool) and timeout_minutes > 0):
        raise ConfigError(f"distributed timeout_minutes={timeout_minutes!r} is invalid: use a positive number of minutes.")
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}: launch lorafit with torchrun, which sets both.")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    backend = None
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
            backend = "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"
        else:
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, timeout=timedelta(minutes=timeout_minutes),
                                    rank=rank, world_size=world, device_id=device if cuda else None)
    _context = Context(rank, local_rank, world, device, backend, float(timeout_minutes))
    if world > 1 and rank == 0:
        print(f"lorafit: {world} processes ({backend}); a collective that waits more than {timeout_minutes:g} min "
              f"ends every rank with an error ({TIMEOUT_HINT} to change it).", flush=True)
    return _context


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; torchrun sets it, "
                          "or unset it for a single-process run.") from None


def record_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for the entry point run by torchrun: an exception on one rank is reported by torchrun with that
    rank and its traceback, and torchrun ends the other ranks (which would otherwise wait in their next collective
    until the timeout)."""
    return record(fn)


def shutdown() -> None:
    """Leave the process group (after the last collective); a no-op in a world of one."""
    global _context
    if dist.is_initialized():
        dist.destroy_process_group()
    _context = None


def context() -> Context:
    """The Context of this process (init() with defaults if nobody called it yet)."""
    return _context if _context is not None else init()


def rank() -> int:
    return context().rank


def world_size() -> int:
    return context().world_size


def is_main() -> bool:
    """True on rank 0, the one process that prints, shows progress bars and writes files."""
    return context().rank == 0


def barrier() -> None:
    """Wait until every rank gets here (e.g. others wait while rank 0 writes a file)."""
    if world_size() > 1:
        dist.barrier()


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: the function runs on rank 0 only and returns None elsewhere (printing, writing files)."""

    @wraps(fn)
    def on_main(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return on_main


@main_only
def print_main(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    print(*args, **kwargs)


def progress_disabled() -> bool:
    """For tqdm(disable=...): only rank 0 draws progress bars."""
    return not is_main()


# --------------------------------------------------------------------------------------------------------------
# Data share and reductions

def share(items: list[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of one global step's rows: items[rank::world_size] (interleaved, as DistributedSampler).

    Deterministic, disjoint, and the shares cover every item exactly once. When the count is not a multiple of
    world_size the first (count % world_size) ranks get one item more, and a rank can get none; nothing is
    dropped or repeated. Unequal shares are fine because the loss is normalised by the global target count
    (gradient_scale); rank_micro_batches (train/batches.py) evens out the number of forward passes.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1}.")
    return items[rank::world_size]


def rank_chunks(items: list[T], chunk_size: int, *, rank: int, world_size: int) -> list[tuple[list[T], bool]]:
    """This rank's share of one step's items (`share`) cut into chunks of `chunk_size`, as (chunk, real) pairs,
    followed by filler chunks (real False) up to the count every rank runs: ceil(ceil(len(items) / world_size) /
    chunk_size).

    Each forward and backward under DDP/FSDP is a collective that every rank must enter the same number of times;
    a rank with fewer items (the count is not a multiple of world_size) runs a filler, a copy of one item (its
    share's first, else the step's first), and multiplies its loss and sums by 0. No items: no chunks. In a world
    of one: the items in order, in chunks, all real.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: a chunk holds at least one item.")
    mine = share(items, rank, world_size)
    chunks = [(mine[i:i + chunk_size], True) for i in range(0, len(mine), chunk_size)]
    needed = math.ceil(math.ceil(len(items) / world_size) / chunk_size)
    filler = (mine or items)[:1]
    return chunks + [(filler, False)] * (needed - len(chunks))


def gather_shares(mine: torch.Tensor, count: int) -> torch.Tensor:
    """Put every rank's per-item results back into the global order: `mine` holds one row per item of this rank's
    share of `count` items (share: items[rank::world_size]); returns the (count, ...) float64 tensor of all ranks'
    rows on every rank (exact: the rows are placed in zeros and summed). A collective; identity in a world of one."""
    rank_, world = rank(), world_size()
    full = torch.zeros((count, *mine.shape[1:]), dtype=torch.float64)
    full[rank_::world] = mine.detach().to("cpu", torch.float64)
    return all_reduce_sum(full)


def all_reduce_sum(value: T) -> T:
    """The sum of `value` over all ranks (an int, float or tensor; returns the same kind); identity in a world of one.

    Used for the step's target count and loss sum. Ints are summed exactly (int64), floats in float64.
    """
    if world_size() == 1:
        return value
    device = context().device
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(device, copy=True)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.to(value.device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"all_reduce_sum takes an int, float or tensor, got {type(value).__name__}.")
    tensor = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return type(value)(tensor.item())


def gradient_scale(global_targets: int) -> float:
    """The factor each rank multiplies its summed micro-batch loss by before backward: world_size / global_targets.

    Arithmetic: rank r backprops L_r * W / T, where L_r is the summed token loss of its micro-batches and T the
    global step's target count (all_reduce_sum). DDP all-reduces gradients with an AVERAGE over the W ranks, and
    FSDP2 reduce-scatters with an average too (ReduceOp.AVG for fp32/bf16 gradients; for fp16 a pre- and
    post-division that multiply to 1/W), so every rank ends with (1/W) * sum_r W * grad(L_r) / T =
    grad(sum_r L_r) / T: the gradient of the global token-mean loss, exactly what one process computes from the
    whole step (independent of how tokens fall across ranks and micro-batches). With W = 1 it is 1 / T.
    """
    if global_targets <= 0:
        raise ValueError(f"global_targets={global_targets}: a step needs at least one target token.")
    return world_size() / global_targets


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` in place with rank `src`'s values (a plain, unsharded tensor); returns it."""
    if world_size() > 1:
        staged = tensor.detach().to(context().device)
        dist.broadcast(staged, src=src)
        if staged.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(staged)
    return tensor


# --------------------------------------------------------------------------------------------------------------
# Wrapping

class Runner(nn.Module):
    """Holds the model; `runner(fn, *args, **kwargs)` returns fn(model, *args, **kwargs).

    DDP and FSDP2 do their work in hooks around the forward of the module they wrap: DDP prepares the gradient
    all-reduce, and the FSDP2 root all-gathers the parameters outside the decoder blocks (embeddings, final norm,
    head). lorafit's loss calls the backbone and the head separately (train/loss.py), and GRPO and generation
    call other methods; running any of them as fn inside this forward puts the whole computation between those
    hooks, whatever methods of the model it calls.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(self.model, *args, **kwargs)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The model inside what wrap() returned (or the model itself): for saving, generation config, names."""
    if isinstance(wrapped, DistributedDataParallel):
        wrapped = wrapped.module
    return wrapped.model if isinstance(wrapped, Runner) else wrapped


def wrap(model: nn.Module, strategy: str, *, reshard_after_forward: bool = True, cpu_offload: bool = False) -> nn.Module:
    """Make `model` train on every rank: returns a callable module, `wrapped(fn, *args)` = fn(model, *args).

    - ddp: DistributedDataParallel with find_unused_parameters=False (every adapter is used every step; works
      with non-reentrant gradient checkpointing, which lorafit uses); gradients are views into DDP's all-reduce
      buckets (no second copy). DDP broadcasts rank 0's parameters and buffers at construction, so all replicas
      start equal.
    - fsdp: FSDP2 `fully_shard` on each decoder block (reshard_after_forward as given), then on the root with
      reshard_after_forward=False (its embeddings and head are needed at both ends of the step). Frozen base
      weights, 4-bit storage (Linear4bit's uint8 codes and scales are plain parameters) and adapters are all
      sharded on dim 0; cpu_offload keeps shards, gradients and the optimizer step on the CPU. Adapters are
      first broadcast from rank 0, because every rank keeps its own slice of its own copy.
    Only the parameters that required grad before (the adapters) require grad after. In a world of one
    the model is returned in a Runner without DDP/FSDP (after checking the strategy name).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed strategy={strategy!r} is unknown: use one of {', '.join(STRATEGIES)}.")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError("the model has no trainable parameter: attach an adapter before wrapping it for training.")
    runner = Runner(model)
    ctx = context()
    if ctx.world_size == 1:
        return runner
    if strategy == "ddp":
        return DistributedDataParallel(runner, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                       find_unused_parameters=False, gradient_as_bucket_view=True)
    for param in model.parameters():
        if param.requires_grad:
            broadcast_(param.data)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    offload = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload)
    runner.blocks_reshard_after_forward = reshard_after_forward  # run_whole restores it
    fully_shard(runner, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    after = {name for name, p in model.named_parameters() if p.requires_grad}
    if after != trainable:
        raise AssertionError(f"sharding changed which parameters train: {sorted(after ^ trainable)[:3]}")
    return runner


def shard_like(tensors: dict[str, torch.Tensor], wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors keyed by parameter name (e.g. a copy of the adapter taken before wrap) laid out like the
    wrapped model's parameters of those names: sharded DTensors where FSDP sharded the parameter, unchanged
    elsewhere; so they can be copied into the parameters in place. Every rank must call it (the same full values)."""
    params = dict(unwrap(wrapped).named_parameters())
    out = {}
    for name, value in tensors.items():
        param = params[name]
        out[name] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements) \
            if isinstance(param, DTensor) else value
    return out


def run_whole(wrapped: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(model, *args, **kwargs) with every weight whole on this rank, so that fn can run the model on its own any
    number of times (e.g. generate replies to its share of prompts, however many tokens each takes, which differs
    between ranks). Every rank must call it; returns fn's result.

    One process or DDP (each rank holds the whole model): fn runs on the unwrapped model, outside DDP's forward
    (which would broadcast buffers, a collective, at every call). FSDP2: every sharded module is all-gathered once
    (after a no-op forward of the root, where FSDP2 initialises lazily), the blocks keep their weights through
    their forwards (reshard-after-forward off, as torch documents for evaluation), and fn runs inside the root's
    forward: there the blocks' hooks see an iteration in progress and run no collective. On the way out the
    shards are restored, with the blocks' reshard setting. Costs the whole model's weights on each rank while fn
    runs.
    """
    sharded = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        return fn(unwrap(wrapped), *args, **kwargs)
    blocks = [m for m in sharded if m is not wrapped]
    wrapped(_no_op)
    for module in sharded:
        module.unshard()
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    try:
        return wrapped(fn, *args, **kwargs)
    finally:
        for block in blocks:
            block.set_reshard_after_forward(wrapped.blocks_reshard_after_forward, recurse=False)
        for module in sharded:
            module.reshard()


def _no_op(model: nn.Module) -> None:
    """A forward that computes nothing (run_whole runs it through the FSDP root)."""


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the items of the nn.ModuleList holding most parameters (model.model.layers in Llama)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"{type(model).__name__} keeps no decoder blocks in an nn.ModuleList, which FSDP shards one "
                          "by one; use strategy 'ddp' for it.")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards under FSDP; everything otherwise)."""
    total = 0
    for param in unwrap(model).parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of the trained parameters (sharded or not) and return it before clipping."""
    grads = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# --------------------------------------------------------------------------------------------------------------
# Saving and resuming

def gather_full_state_dict(model: nn.Module, keys_filter: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every shard gathered: on rank 0 full CPU copies, on other ranks None.

    A collective: every rank must call it (all ranks walk the same keys in the same order, and each sharded
    tensor is all-gathered with full_tensor()). keys_filter(name) picks the keys (default: all); names are
    the unwrapped model's own.
    """
    keep = is_main()
    out: dict[str, torch.Tensor] = {}
    for name, value in unwrap(model).state_dict().items():
        if keys_filter is not None and not keys_filter(name):
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
    return out if keep else None


def save_adapter(wrapped: nn.Module, path: str | Path, **kwargs: Any) -> Path:
    """Gather the adapter from every rank's shards and write it on rank 0 in PEFT's format (adapters.io.save_adapter);
    the other ranks write nothing and wait until the folder is complete. Every rank must call it."""
    model = unwrap(wrapped)
    parameters = gather_adapter(model)
    if parameters is not None:
        adapter_io.save_adapter(model, path, parameters=parameters, **kwargs)
    barrier()
    return Path(path)


def gather_adapter(wrapped: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's parameters (name -> full CPU tensor, every rank's shard included) on rank 0; None elsewhere.
    Every rank must call it."""
    model = unwrap(wrapped)
    names = set(adapter_io.adapter_parameter_names(model))
    return gather_full_state_dict(model, names.__contains__)


def load_full_parameters(wrapped: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
    """Copy full tensors keyed by parameter name (gather_adapter's, kept from an earlier step) into the wrapped
    model's parameters of those names; each rank keeps its shard. Rank 0 passes the tensors, the others None
    (rank 0's are broadcast). Every rank must call it.

    Under FSDP2 a module left unsharded by a forward (the root keeps its weights after an evaluation) is put
    back in its sharded form first (torch's load_state_dict hooks), so the values land in the shards it trains."""
    model = unwrap(wrapped)
    if world_size() == 1:
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(tensors) if is_main() else {}, options=options)


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer state keyed by parameter name (not by position or shard), full tensors on CPU, on rank 0;
    None on other ranks. Independent of the world size and strategy, so it resumes on any number of processes.
    Every rank must call it."""
    model = unwrap(wrapped)
    if world_size() == 1:
        return _optimizer_state_by_name(model, optimizer)
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else None


def load_full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Load a state from full_optimizer_state (read on rank 0; other ranks pass None): each rank keeps its shard.
    Every rank must call it."""
    model = unwrap(wrapped)
    if world_size() == 1:
        _load_optimizer_state_by_name(model, optimizer, state)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, state if is_main() else {}, options=options)


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with parameter names for the positional ids (the layout get_optimizer_state_dict uses)."""
    names = {id(p): name for name, p in model.named_parameters()}
    ids = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    raw = optimizer.state_dict()
    state = {ids[i]: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in raw["state"].items()}
    groups = [dict(group, params=[ids[i] for i in group["params"]]) for group in raw["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    names = {id(p): name for name, p in model.named_parameters()}
    ids = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    position = {name: i for i, name in enumerate(ids)}
    missing = sorted(set(ids) - set(state["state"]))
    if missing:
        raise ConfigError(f"the optimizer state has no entry for {missing[0]!r} ({len(missing)} missing): it was saved "
                          "for another adapter; resume from a checkpoint of this run.")
    groups = [dict(group, params=[position[n] for n in group["params"]]) for group in state["param_groups"]]
    optimizer.load_state_dict({"state": {position[n]: s for n, s in state["state"].items()}, "param_groups": groups})


# --------------------------------------------------------------------------------------------------------------
# Strategy choice

def choose_strategy(requested: str | None, model_bytes: int, device_bytes: int) -> tuple[str, str]:
    """('ddp' | 'fsdp', why): the requested strategy, or by default fsdp when one process's training memory
    (`model_bytes`, lorafit.diagnose.memory's estimate for one process) exceeds one device's memory, else ddp."""
    if requested not in (None, "auto", *STRATEGIES):
        raise ConfigError(f"distributed strategy={requested!r} is unknown: use auto, {' or '.join(STRATEGIES)}.")
    if requested in STRATEGIES:
        return requested, "set in the config"
    need, have = model_bytes / 1e9, device_bytes / 1e9
    if model_bytes > device_bytes:
        return "fsdp", f"one process would need {need:.1f} GB (estimate) but a device has {have:.1f} GB: shard it"
    return "ddp", f"one process needs {need:.1f} GB (estimate), which fits a device's {have:.1f} GB: replicate it"


def device_memory_bytes(device: torch.device | None = None) -> int:
    """Total memory of the training device: the GPU's, or the machine's RAM for the CPU."""
    device = device or context().device
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

