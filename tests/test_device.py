"""Peak memory per window: the process's peak RSS grows by what a step allocates and resets between steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafit.device import peak_memory_mib, reset_peak_memory

CPU = torch.device("cpu")
BLOCK_MIB = 256


def test_peak_rss_sees_an_allocation_and_forgets_it_after_a_reset():
    reset_peak_memory(CPU)
    before = peak_memory_mib(CPU)["peak_rss_mib"]
    block = torch.ones(BLOCK_MIB * 2**20 // 4)  # 256 MiB of float32, every page written
    during = peak_memory_mib(CPU)["peak_rss_mib"]
    del block
    assert during >= before + 0.95 * BLOCK_MIB
    assert set(peak_memory_mib(CPU)) == {"peak_rss_mib"}  # no CUDA columns for a CPU run
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs (not Linux): the peak RSS cannot be reset, it is the lifetime peak")
    reset_peak_memory(CPU)
    assert peak_memory_mib(CPU)["peak_rss_mib"] < during - 0.9 * BLOCK_MIB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the allocator's peak statistics")
def test_cuda_peaks_follow_torch_allocator():
    device = torch.device("cuda")
    reset_peak_memory(device)
    block = torch.ones(BLOCK_MIB * 2**20 // 4, device=device)
    peak = peak_memory_mib(device)
    assert peak["cuda_max_allocated_mib"] >= BLOCK_MIB and peak["cuda_max_reserved_mib"] >= BLOCK_MIB
    del block
    reset_peak_memory(device)
    assert peak_memory_mib(device)["cuda_max_allocated_mib"] < BLOCK_MIB
