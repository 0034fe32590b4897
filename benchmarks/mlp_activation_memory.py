"""lorafit's fused MLP tail against PyTorch's selective activation checkpointing (SAC) and the stock MLP.

A stack of SmolLM2-shaped Llama MLPs (576 -> 1536 -> 576, residual adds) with LoRA r=16 dropout 0.05 on gate, up
and down, 1024 tokens, fp32, one thread. Three ways to run the same forward:
- stock: transformers' MLP on lorafit's LoRA layers (attach's fused forwards removed);
- sac: each MLP under torch.utils.checkpoint with create_selective_checkpoint_contexts, a policy that saves every
  mm / addmm output and recomputes the rest (silu, the product) in the backward pass. lorafit's LoRA function scales
  its (T, r) product in place, which SAC refuses unless allow_cache_entry_mutation=True, so it is set; the replayed
  forward then reads the already-scaled cache entry and scales it again: with dropout 0.05 the LoRA gradients came
  out 5.3% too large (1/(1-p) twice), measured against the stock MLP with the same draws;
- fused: what `attach` installs (adapters/swiglu.py).
Reported: the allocator's peak during the forward (what is kept for the backward pass, plus the forward's
temporaries; benchmarks/peak_memory.py) and the CPU time of forward + backward, median of --repeats, the three
variants interleaved.

Run: OMP_NUM_THREADS=1 python benchmarks/mlp_activation_memory.py [--layers 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from common import markdown_table, median
from peak_memory import measure_peak_bytes
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import lorafit
from lorafit.adapters.fused import install_fused_forwards, remove_fused_forwards

TOKENS, HIDDEN, INTERMEDIATE = 1024, 576, 1536
SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """SAC policy: keep every matmul's output, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class MLPStack(nn.Module):
    """Residual MLPs, optionally each under selective checkpointing."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
        self.mlps = nn.ModuleList(LlamaMLP(config) for _ in range(layers))
        self.selective = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contexts = functools.partial(create_selective_checkpoint_contexts, save_matmuls, allow_cache_entry_mutation=True)
        for mlp in self.mlps:
            x = x + (checkpoint(mlp, x, use_reentrant=False, context_fn=contexts) if self.selective else mlp(x))
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLPStack(args.layers)
    adapter = lorafit.AdapterConfig(r=16, alpha=32, dropout=0.05, target_modules=["gate_proj", "up_proj", "down_proj"])
    lorafit.attach(model, adapter, warn_scale=False).train()
    x0 = torch.randn(TOKENS, HIDDEN)
    variants = {"stock": (False, False), "sac": (True, False), "fused": (False, True)}
    peaks: dict[str, int] = {}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (selective, fused) in variants.items():
            (install_fused_forwards if fused else remove_fused_forwards)(model)
            model.selective = selective
            x = x0.clone().requires_grad_(True)
            start = time.process_time()
            out, peaks[name] = measure_peak_bytes(lambda x=x: model(x))
            out.sum().backward()
            cpu[name].append(time.process_time() - start)
    rows = [[name, f"{peaks[name] / 1e6:.1f}", f"{peaks[name] / peaks['stock']:.2f}",
             f"{median(cpu[name]) * 1e3:.0f}", f"{median(cpu[name]) / median(cpu['stock']):.2f}"] for name in variants]
    print(markdown_table(["variant", "forward peak MB", "x stock", "fwd+bwd CPU ms (median)", "x stock"], rows))


if __name__ == "__main__":
    main()
