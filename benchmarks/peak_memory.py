"""Peak CPU memory of a call, as PyTorch's allocator saw it (benchmarks/memory_estimate.py and the estimator's tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def measure_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run fn() and return (its result, the peak of CPU bytes allocated minus freed during the call).

    The CPU counterpart of torch.cuda.max_memory_allocated: it replays the allocation events torch.profiler
    records. Memory held before the call is not counted, nor are allocations made outside PyTorch's
    allocator (e.g. oneDNN scratch space).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak
