"""Peak memory per window (the process's peak RSS grows by what a step allocates and resets between steps), and the
bf16 decision (bf16_worthwhile) with the machine mocked."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafit.device as device_module
from lorafit.device import peak_memory_mib, reset_peak_memory
from lorafit.errors import UserError

CPU = torch.device("cpu")
BLOCK_MIB = 256


PEAK_SCRIPT = """
import json, torch
from lorafit.device import peak_memory_mib, reset_peak_memory
cpu = torch.device("cpu")
reset_peak_memory(cpu)
before = peak_memory_mib(cpu)
block = torch.ones(%d * 2**20 // 4)  # every page written
during = peak_memory_mib(cpu)
del block
reset_peak_memory(cpu)
print(json.dumps([before, during, peak_memory_mib(cpu)]))
""" % BLOCK_MIB


def test_peak_rss_sees_an_allocation_and_forgets_it_after_a_reset():
    """In a child of this (large) pytest process: getrusage's ru_maxrss there starts at the parent's peak (it keeps
    the image before exec), so it saw no allocation smaller than that; the peak must be the child's own."""
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    before, during, after = json.loads(run.stdout.splitlines()[-1])
    assert during["peak_rss_mib"] >= before["peak_rss_mib"] + 0.95 * BLOCK_MIB
    assert set(during) == {"peak_rss_mib"}  # no CUDA columns for a CPU run
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs (not Linux): the peak RSS cannot be reset, it is the lifetime peak")
    assert after["peak_rss_mib"] < during["peak_rss_mib"] - 0.9 * BLOCK_MIB


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


# --- bf16_worthwhile: the decision, with the machine (flags, probe, CUDA) mocked; no wall-clock assertions ---

@pytest.fixture
def bf16_decision(monkeypatch):
    """A fresh decision: no LORAFIT_BF16 pin (conftest sets one), no cached probe result; the probe is counted."""
    monkeypatch.delenv(device_module.BF16_ENV, raising=False)
    device_module.cpu_bf16_fast.cache_clear()
    calls = []

    def machine(flags, fp32_s, bf16_s):
        monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
        monkeypatch.setattr(device_module, "matmul_probe_seconds", lambda: calls.append(1) or (fp32_s, bf16_s))
        return calls

    yield machine
    device_module.cpu_bf16_fast.cache_clear()


def test_cpu_with_bf16_instructions_and_a_fast_probe_uses_bf16(bf16_decision):
    calls = bf16_decision(frozenset({"avx512f", "avx512_bf16"}), fp32_s=0.0118, bf16_s=0.0024)
    assert device_module.bf16_worthwhile(CPU) is True
    assert device_module.default_compute_dtype(CPU) == torch.bfloat16
    assert len(calls) == 1  # cached: the second question did not probe again


def test_cpu_whose_probe_is_slow_keeps_fp32(bf16_decision):
    bf16_decision(frozenset({"amx_bf16"}), fp32_s=0.0100, bf16_s=0.0090)  # faster, but under PROBE_MIN_SPEEDUP
    assert device_module.bf16_worthwhile(CPU) is False
    assert device_module.default_compute_dtype(CPU) == torch.float32


def test_cpu_without_bf16_flags_keeps_fp32_without_probing(bf16_decision):
    calls = bf16_decision(frozenset({"avx2", "avx512f"}), fp32_s=0.01, bf16_s=0.001)
    assert device_module.bf16_worthwhile(CPU) is False
    assert calls == []


def test_unreadable_flags_leave_the_decision_to_the_probe(bf16_decision):
    bf16_decision(None, fp32_s=0.0118, bf16_s=0.0024)
    assert device_module.bf16_worthwhile(CPU) is True


def test_cuda_path_asks_the_gpu_not_the_cpu_probe(bf16_decision, monkeypatch):
    calls = bf16_decision(frozenset({"avx512_bf16"}), fp32_s=0.01, bf16_s=0.001)
    cuda = torch.device("cuda")
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert device_module.bf16_worthwhile(cuda) is supported
    assert calls == []
    assert device_module.bf16_worthwhile(torch.device("meta")) is False


def test_environment_override_wins_and_rejects_other_values(bf16_decision, monkeypatch):
    calls = bf16_decision(frozenset({"avx512_bf16"}), fp32_s=0.01, bf16_s=0.001)
    monkeypatch.setenv(device_module.BF16_ENV, "0")
    assert device_module.bf16_worthwhile(CPU) is False
    monkeypatch.setenv(device_module.BF16_ENV, "1")
    assert device_module.bf16_worthwhile(CPU) is True and device_module.bf16_worthwhile(torch.device("cuda")) is True
    assert calls == []
    monkeypatch.setenv(device_module.BF16_ENV, "yes")
    with pytest.raises(UserError, match="LORAFIT_BF16='yes'"):
        device_module.bf16_worthwhile(CPU)


def test_cpu_flags_parse_this_machine():
    flags = device_module.cpu_flags()
    if flags is None:
        pytest.skip("no readable /proc/cpuinfo flags line (not x86 Linux)")
    assert flags and all(" " not in flag for flag in flags)


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
