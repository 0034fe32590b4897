"""Peak memory per window: the process's peak RSS grows by what a step allocates and resets between steps."""

from __future__ import annotations

import platform
import subprocess
import sys
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


FRAGMENT_SCRIPT = """
import sys, torch
from lorafit.device import return_freed_host_memory
if sys.argv[1] == "set":
    assert return_freed_host_memory()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
warm = torch.ones(2**20)  # 4 MiB allocated and freed: glibc's dynamic mmap threshold rises above 4 MiB
del warm
start = rss_mib()
blocks = [torch.ones(2**20) for _ in range(64)]  # 64 x 4 MiB, every page written
del blocks[::2]  # free every other one: 32 holes of 4 MiB between live blocks
print(rss_mib() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt and /proc/self/statm are Linux + glibc")
def test_freed_host_buffers_go_back_to_the_os():
    """With the fixed threshold, the 32 freed 4 MiB tensors leave RSS (128 MiB kept); by default glibc keeps them."""
    def held(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", FRAGMENT_SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(run.stdout.split()[-1])

    assert held("default") > 200  # the premise: ~256 MiB, the holes stay resident
    assert 120 < held("set") < 150  # the 32 live blocks only
