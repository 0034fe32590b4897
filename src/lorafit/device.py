"""Device choice (CUDA when present, else CPU; nothing in lorafit names a device otherwise), whether bf16 pays on it,
and peak memory."""

from __future__ import annotations

import functools
import os
import ctypes
import ctypes.util
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from lorafit.errors import UserError

BF16_ENV = "LORAFIT_BF16"  # "1" / "0": force bf16 autocast and 4-bit compute in bf16 on or off, skipping the decision
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 instructions that make bf16 matmuls fast
PROBE_SHAPE = (1024, 576, 1536)  # (rows, in, out): a SmolLM2-sized block linear on a 4 x 256 batch
PROBE_REPEATS = 3
PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much: autocast's casts eat a small margin


def default_device() -> torch.device:
    """The device to train on by default: the first CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_worthwhile(device: torch.device) -> bool:
    """Whether bf16 (autocast, and the compute dtype of 4-bit layers) speeds up training on `device`.

    The one owner of that decision ("bf16: auto" and default_compute_dtype ask here). In order:
    LORAFIT_BF16=1/0 in the environment decides outright; CUDA: the GPU supports bf16; CPU: the CPU has
    native bf16 instructions (AVX-512 BF16 or AMX) and a timed probe confirms bf16 matmuls are really faster
    (cpu_bf16_fast). CPUs without them (AVX2-only, or AVX-512 without BF16) run bf16 matmuls 6-70x slower than
    fp32 (measured on an AVX2 machine: 828x1536 @ 1536x576 took 701 ms vs 9.4 ms), so "auto" keeps fp32 there.
    """
    override = os.environ.get(BF16_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise UserError(f"environment variable {BF16_ENV}={override!r}: use 1 (bf16 on), 0 (off), or unset it.")
        return override == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_fast()


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where bf16 is fast (bf16_worthwhile), else fp32."""
    return torch.bfloat16 if bf16_worthwhile(device) else torch.float32


@functools.cache
def cpu_bf16_fast() -> bool:
    """Whether this CPU runs bf16 matmuls clearly faster than fp32; decided once per process.

    Where the CPU's flags are readable (Linux) and name neither avx512_bf16 nor amx_bf16, no probe runs (it
    would take seconds there). Otherwise the probe decides: bf16 must be >= PROBE_MIN_SPEEDUP x faster.
    """
    flags = cpu_flags()
    if flags is not None and not flags & CPU_BF16_FLAGS:
        return False
    fp32_s, bf16_s = matmul_probe_seconds()
    return fp32_s >= PROBE_MIN_SPEEDUP * bf16_s


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def matmul_probe_seconds() -> tuple[float, float]:
    """Best-of-PROBE_REPEATS seconds of one PROBE_SHAPE matmul on the CPU in fp32 and in bf16 (after a warm-up)."""
    rows, n_in, n_out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=generator)
    w = torch.randn(n_in, n_out, generator=generator)
    seconds = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        a @ b  # warm-up: first-call dispatch and packing
        best = float("inf")
        for _ in range(PROBE_REPEATS):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return seconds[0], seconds[1]


MIB = 2**20
HEAD_CHUNK_BYTES = 64 * MIB  # fp32 logits of one chunk of the head loss (train/loss.py); here, below both the loss
                             # and the memory estimator (diagnose/memory.py) that models it


def head_chunk_rows(vocab_size: int) -> int:
    """Rows of (rows, vocab) fp32 logits the head loss holds at once: 341 for a 49k vocabulary, 130 for 128k.

    Small enough that the chunk is a minor part of a step's memory; large enough that each chunk's matmul
    (rows x hidden @ hidden x vocab) still reuses the head weight ~130+ times per read from memory.
    """
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab_size))


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS);
    False where that is not possible (the peak then stays the process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5 = reset the peak resident set size (proc(5))
    except OSError:
        return False
    return True


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: the process's peak RSS (reset_peak_rss) and, on CUDA, the allocator's peak
    statistics."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_bytes() -> int:
    """The process's peak resident set since reset_peak_rss: Linux's VmHWM. Not getrusage's ru_maxrss there: it
    also holds the peak of the image before exec, i.e. of the parent a process was forked from (a `lorafit train`
    started by a 2 GB process reported 2 GB before it allocated anything). Elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024)


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory since the last reset_peak_memory, in MiB: the process's resident set (host memory, the whole
    footprint on CPU) and, on CUDA, the peak allocated and reserved by torch's allocator."""
    peak = {"peak_rss_mib": round(peak_rss_bytes() / MIB, 1)}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        peak["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / MIB, 1)
    return peak


GLIBC_MMAP_THRESHOLD = 2**20  # host allocations of 1 MiB or more get their own mapping, returned to the OS on free
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def return_freed_host_memory() -> bool:
    """Make glibc give large freed host buffers back to the OS at once; True where it was set (Linux with glibc).

    glibc serves a request from its heap unless it is above the mmap threshold, and that threshold grows up
    to 32 MB each time a mapped block is freed. Training frees and reallocates activations of a few MB all
    step long, so after the first free of such a tensor they come from the heap, whose freed space glibc
    keeps: the process's RSS ends up above what PyTorch holds. Measured on a 4-block Llama-3.2-1B-shaped
    QLoRA step (benchmarks/scale.py): +0.25 GB over the allocator's peak by default, none with a fixed 1 MiB
    threshold, which also turns the dynamic adjustment off. The cost is one mmap/munmap per large tensor and the
    page faults of every fresh mapping: the quickstart's CPU step took 2.0x as long (12 steps, 41.5 s vs 20.4 s,
    sys time 33 s vs 2 s) for 0.31 GB less peak RSS (1.88 vs 2.19 GB). So it is opt-in
    (training.release_host_memory), for runs near the machine's RAM limit.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD))
