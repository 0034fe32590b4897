"""A small hand-written training loop on a tiny Llama (fp32 or 4-bit base) that runs the same on 1 or N processes.

Used by run_scenarios.py (2 processes under torchrun) and by the tests (the 1-process reference). It drives
lorafit.distributed the way a trainer will: share of each global step's rows, global target count, gradient
scale, clipping, AdamW, adapter save gathered from every rank's shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, build_tiny

from lorafit import distributed
from lorafit.adapters.io import load_adapter_tensors, read_adapter_weights
from lorafit.adapters.model import attach
from lorafit.config import AdapterConfig
from lorafit.data.chat import IGNORE, TokenizedExample
from lorafit.models.load import quantize_block_linears
from lorafit.train.batches import rank_micro_batches, step_rows
from lorafit.train.loss import target_loss_sum

NUM_ROWS, BATCH, MICRO, STEPS, SEED = 15, 5, 2, 4, 0  # 5 rows a step: ranks get 3 and 2 (and a filler micro-batch)
LR, MAX_NORM, PAD = 2e-2, 0.25, 0  # the norm is 0.19-0.32: some steps clip
# <strategy>-<base>[-dora][-ckpt]: DoRA adapters, non-reentrant gradient checkpointing
SCENARIOS = ["ddp-fp32", "ddp-nf4", "fsdp-fp32", "fsdp-nf4", "ddp-fp32-dora-ckpt", "fsdp-nf4-dora-ckpt"]
RESUMED = ["ddp-fp32", "fsdp-nf4"]  # also run as 2 steps + checkpoint, then resumed for the rest
CHECKPOINT_STEP = 2


def reference_name(name: str) -> str:
    """The 1-process run a scenario must equal: the same model and adapter, no strategy."""
    return name.split("-", 1)[1]


def make_rows() -> list[TokenizedExample]:
    """Rows of unequal length and unequal target counts (a prompt of 1-4 tokens without targets)."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for i in range(NUM_ROWS):
        ids = torch.randint(4, VOCAB, (6 + (i * 5) % 11,), generator=generator).tolist()
        prompt = 1 + i % 4
        rows.append(TokenizedExample(ids, [IGNORE] * prompt + ids[prompt:], False, f"row{i}"))
    return rows


def build_model(name: str) -> torch.nn.Module:
    """The tiny Llama (fixed seed), its block linears in NF4 for '-nf4', with a LoRA (or DoRA) adapter (fixed seed)."""
    model = build_tiny("llama")
    if "nf4" in name.split("-"):
        quantize_block_linears(model, compute_dtype=torch.float32)
    torch.manual_seed(1)
    attach(model, AdapterConfig(r=4, alpha=8, dropout=0.0, use_dora="dora" in name.split("-")), warn_scale=False)
    if "ckpt" in name.split("-"):
        model.train()  # transformers checkpoints blocks in training mode only (dropout is 0 everywhere)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def train(name: str, out: Path, *, start: int = 0, stop: int = STEPS,
          resume_from: Path | None = None, checkpoint_at: int | None = None) -> torch.nn.Module:
    """Train steps start..stop-1; every rank writes out/rank<r>.json, rank 0 the adapter (out/adapter) and, after
    step `checkpoint_at`, a checkpoint (out/checkpoint: adapter + optimizer state by name); resume_from reads one."""
    ctx = distributed.context()
    strategy = name.split("-")[0] if name.split("-")[0] in distributed.STRATEGIES else "ddp"  # 1 process: no wrapper
    model = build_model(name)
    if resume_from is not None:
        load_adapter_tensors(model, read_adapter_weights(resume_from / "adapter"), resume_from / "adapter")
    bytes_full = distributed.local_parameter_bytes(model)
    wrapped = distributed.wrap(model, strategy)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP2's sharded parameters
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    if resume_from is not None:
        distributed.load_full_optimizer_state(wrapped, optimizer, read_optimizer_state(resume_from) if ctx.is_main else None)
    rows = make_rows()
    record = {"losses": [], "norms": [], "seen": [], "replica_diff": [], "bytes_full": bytes_full,
              "bytes_local": distributed.local_parameter_bytes(wrapped), "micro_batches": []}
    for step in range(start, stop):
        step_rows_ = step_rows(rows, step, batch_size=BATCH, seed=SEED)
        batches = rank_micro_batches(step_rows_, MICRO, PAD, rank=ctx.rank, world_size=ctx.world_size)
        record["seen"].append([r.source for r in distributed.share(step_rows_, ctx.rank, ctx.world_size)])
        record["micro_batches"].append(len(batches))
        targets = distributed.all_reduce_sum(sum(b.targets for b in batches))
        loss_sum = 0.0
        for batch in batches:
            loss = wrapped(target_loss_sum, batch.tensors)
            (loss * distributed.gradient_scale(targets)).backward()
            loss_sum += loss.item()
        record["norms"].append(distributed.clip_grad_norm(params, MAX_NORM))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["losses"].append(distributed.all_reduce_sum(loss_sum) / targets)
        record["replica_diff"].append(max(
            (p.detach() - distributed.broadcast_(p.detach().clone())).abs().max().item() for p in params
        ) if strategy == "ddp" else None)
        if step + 1 == checkpoint_at:
            distributed.save_adapter(wrapped, out / "checkpoint" / "adapter")
            state = distributed.full_optimizer_state(wrapped, optimizer)
            if ctx.is_main:
                write_optimizer_state(state, out / "checkpoint")
            distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    distributed.save_adapter(wrapped, out / "adapter")
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    return wrapped


def write_optimizer_state(state: dict, folder: Path) -> None:
    """Optimizer state by parameter name as safetensors (tensors) + JSON (param groups), no pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}/{key}": value.contiguous() for name, entry in state["state"].items() for key, value in entry.items()}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(state["param_groups"]))


def read_optimizer_state(folder: Path) -> dict:
    state: dict[str, dict] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": json.loads((folder / "optimizer.json").read_text())}


def save_rank_marked_adapter(wrapped: torch.nn.Module, path: Path) -> None:
    """Fill each rank's local shard of every adapter tensor with rank + 1, then save: the file must hold all values."""
    names = set(distributed.adapter_io.adapter_parameter_names(distributed.unwrap(wrapped)))
    with torch.no_grad():
        for name, param in distributed.unwrap(wrapped).named_parameters():
            if name in names:
                param.to_local().fill_(distributed.rank() + 1)
    distributed.save_adapter(wrapped, path)
