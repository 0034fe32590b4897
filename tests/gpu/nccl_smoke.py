"""Run by test_gpu_training.py under torchrun on 2 GPUs: lorafit.distributed joins with NCCL, each rank on its own
GPU, and an all-reduce of a tensor and of an int gives the sum over ranks. Exits non-zero on any mismatch."""

from __future__ import annotations

import torch

from lorafit import distributed

context = distributed.init()
assert context.backend == "nccl" and context.device == torch.device("cuda", context.local_rank), context
total = distributed.all_reduce_sum(torch.full((1024,), float(context.rank + 1), device=context.device))
assert torch.equal(total, torch.full((1024,), 3.0, device=context.device)), total[:4]
assert distributed.all_reduce_sum(context.rank + 1) == 3
distributed.shutdown()
