"""Shared helpers for the benchmark scripts: worker subprocesses, memory, timing, tables, machine info.

A benchmark script runs each measurement in its own process (`run_worker`) so that peak memory is per run;
the worker prints one JSON object as the last line of its stdout. Results are written with
`lorafit.fileio.write_json_atomic`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lorafit.device import peak_rss_bytes
from lorafit.fileio import write_json_atomic

GB = 1e9
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one, else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_all_cpus() -> int:
    """Let torch use every available core for intra-op work; returns the thread count."""
    threads = available_cpus()
    torch.set_num_threads(threads)
    return threads


PHASE_PREFIX = "phase: "  # a worker's stdout line naming what it does now (emit_phase), read when it is killed
RSS_POLL_S = 0.1


def run_worker(script: str | Path, args: Sequence[str], rss_limit: int | None = None,
               min_available: int | None = None) -> dict[str, Any]:
    """Run `python script --worker *args` in a fresh process and return the JSON its last stdout line holds.

    The worker's stderr (progress bars, warnings, tracebacks) passes straight through to ours. rss_limit (bytes):
    a watchdog reads the worker's RSS every RSS_POLL_S and kills it above the limit (a shared machine must not run
    out of memory); the result is then {"error": "failed at <its last emit_phase>: RSS > <limit> GB", ...}.
    min_available (bytes): it is killed too when the machine's available memory falls below this (other users'
    processes grow as well), reported as "failed at <phase>: machine memory available < <floor> GB (RSS <x> GB)".
    """
    command = [sys.executable, str(script), "--worker", *args]
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(command, stdout=stdout, text=True)
        killed_at, why = None, ""
        while proc.poll() is None:
            rss = process_rss_bytes(proc.pid)
            if rss_limit is not None and rss > rss_limit:
                why = f"RSS > {rss_limit / GB:g} GB"
            elif min_available is not None and 0 < available_memory_bytes() < min_available:
                why = f"machine memory available < {min_available / GB:g} GB (RSS {rss / GB:.2f} GB)"
            if why:
                proc.kill()
                killed_at = rss
                break
            time.sleep(RSS_POLL_S)
        proc.wait()
        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.strip()]
    if killed_at is not None:
        phases = [line.removeprefix(PHASE_PREFIX) for line in lines if line.startswith(PHASE_PREFIX)]
        phase = phases[-1] if phases else "start"
        return {"error": f"failed at {phase}: {why}", "phase": phase, "killed_rss": killed_at}
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(command)} failed with exit status {proc.returncode}; see its stderr above")
    return json.loads(lines[-1])


def emit_phase(name: str) -> None:
    """Say on stdout what a worker does now, for run_worker's report when its watchdog kills it."""
    print(f"{PHASE_PREFIX}{name}", flush=True)


def available_memory_bytes() -> int:
    """The machine's MemAvailable (Linux /proc/meminfo); 0 where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` now (Linux /proc); 0 when it has gone or /proc is missing."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


def save_results(results: dict[str, Any], out: Path | None) -> None:
    """Write a benchmark's results JSON atomically (nothing when out is None, e.g. a --quick smoke run)."""
    if out is not None:
        write_json_atomic(out, results)
        print(f"\nwrote {out}")


def emit_worker_result(result: dict[str, Any]) -> None:
    """Print a worker's result as the single JSON line `run_worker` reads."""
    print(json.dumps(result), flush=True)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak so far, the best available)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    return peak_rss_bytes()


def reset_cuda_peak(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_memory_bytes(device: torch.device) -> dict[str, int] | None:
    """Allocated and peak-allocated CUDA memory on `device`, or None off CUDA."""
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Call `step` warmup + steps times; return (seconds of each timed step, loss of every call).

    `step` returns the (detached) loss; it is read after the clock stops so the read is not timed.
    """
    times: list[float] = []
    losses: list[float] = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
    return times, losses


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are printed with str()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device, packages: Sequence[str] = ("torch", "transformers", "peft", "lorafit")) -> dict[str, Any]:
    """Where the numbers come from: host, CPUs, device, Python and package versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "device": str(device),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in packages},
        "load_average": load_average(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info
