"""Device choice (CUDA when present, else CPU; nothing in lorafit names a device otherwise) and peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource
import sys

import torch


def default_device() -> torch.device:
    """The device to train on by default: the first CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_worthwhile(device: torch.device) -> bool:
    """Whether bf16 autocast speeds up training on `device`: CUDA GPUs with bf16 support.

    Not on CPU: without native bf16 instructions (e.g. AVX2-only machines like ours), bf16 matmuls
    run 6-70x slower than fp32 (measured: 828x1536 @ 1536x576 took 701 ms vs 9.4 ms), so "auto" keeps fp32.
    """
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where bf16 is fast (CUDA), else fp32."""
    return torch.bfloat16 if bf16_worthwhile(device) else torch.float32


MIB = 2**20
CHUNK_ROWS = 512  # rows of the head loss's logits held at once (train/loss.py): 512 x 49k vocab x 4 B = 100 MB;
                  # here, below both the loss and the memory estimator (diagnose/memory.py) that models it


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: the process's peak RSS (Linux: /proc/self/clear_refs; elsewhere the peak
    stays the process's lifetime peak) and, on CUDA, the allocator's peak statistics."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5 = reset the peak resident set size (proc(5))
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory since the last reset_peak_memory, in MiB: the process's resident set (host memory, the whole
    footprint on CPU) and, on CUDA, the peak allocated and reserved by torch's allocator."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mib": round(rss * (1 if sys.platform == "darwin" else 1024) / MIB, 1)}
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
    threshold, which also turns the dynamic adjustment off. The cost is one mmap/munmap per large tensor.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD))
