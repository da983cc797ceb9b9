"""Shared measuring tools for the benchmarks: peak memory of a call and copy bandwidth.

Speed figures are medians and ratios against a reference measured in the same run (machines
here are shared and noisy); see benchmarks/RESULTS.md for the recorded figures.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated by torch during one call of ``fn``, above what was live before.

    CUDA uses the caching allocator's counters. CPU replays the profiler's per-event memory
    (``profile_memory=True``) in time order and keeps the running maximum.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    # In this torch an allocation made inside an op is reported as that op's *self* memory (only
    # frees and allocations outside ops are "[memory]" events). Allocations count from their
    # event's start and frees from its end, which bounds the true peak from above.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def copy_seconds(nbytes: int, repeats: int = 20, device: str = "cpu") -> float:
    """Median seconds of a plain tensor copy of ``nbytes`` bytes (read + write of nbytes each)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bandwidth_fraction(bytes_moved: int, seconds: float, device: str = "cpu") -> float:
    """Bytes moved per second as a fraction of a plain copy moving the same bytes.

    A copy of b bytes reads b and writes b; an op that reads b bytes and writes little moves b,
    so it is compared with a copy of b/2 bytes (which also moves b).
    """
    ref = copy_seconds(max(bytes_moved // 2, 1), device=device)
    return ref / seconds if seconds > 0 else float("nan")


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def in_cache_fraction(fn: Callable[..., object], inputs: tuple, bytes_moved: int,
                      cache_bytes: int = 512 * 1024, repeats: int = 31) -> float:
    """Copy-bandwidth fraction the CPU forward ``fn(*inputs)`` would reach if memory were free.

    Tells a memory-bound op from a compute-bound one, measured in the same run as the copy:
    ``fn`` runs on the first k rows (dim 0) of its inputs, k as large as fits ``cache_bytes``
    (half of a 1 MiB L2, so they stay cached between calls), and its per-row time is scaled to
    all rows. The fixed cost of one call (the op on a 1 x 16 corner of the inputs) is counted
    once, not once per slice. When even this is below 0.5, no memory schedule can bring the op
    to half of copy bandwidth on this core: its arithmetic is the bound.
    """
    rows = inputs[0].shape[0]
    row_bytes = sum(x[:1].numel() * x.element_size() for x in inputs)
    k = max(1, min(rows, cache_bytes // max(row_bytes, 1)))
    small = tuple(x[:k] for x in inputs)
    corner = tuple(x[(slice(0, 1),) * (x.dim() - 1) + (slice(0, 16),)] for x in inputs)
    with torch.no_grad():
        for _ in range(3):  # warm the caches and any lazy initialisation
            fn(*small)
            fn(*corner)
        fixed = _median_seconds(lambda: fn(*corner), repeats)
        per_slice = max(_median_seconds(lambda: fn(*small), repeats) - fixed, 0.0)
    seconds = fixed + per_slice * rows / k
    return copy_seconds(max(bytes_moved // 2, 1)) / seconds
