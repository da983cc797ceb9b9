"""Peak-memory measurement for the softmax_kl and pearson benchmarks.

common.peak_memory_bytes reads only the profiler's "[memory]" events, which on CPU in this
torch miss allocations made inside ops (they are reported as the op's self memory), so it
reads ~0 for any op. Until common.py is fixed, these benchmarks measure CPU peaks here.
"""
import torch


def cpu_peak_bytes(fn):
    """Peak bytes allocated during one CPU call, above what was live before.

    From the profiler's per-op self memory: allocations count from their op's start, frees from
    its end (an upper bound on the true peak). The "[memory]" events alone miss allocations
    made inside ops on CPU.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
         e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device):
    if device == "cpu":
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
