"""The one runner of the benchmarks: a ``bench_<op>.py`` file builds its inputs and names its
providers; this module runs them, times them and records what they cost.

Kernel benchmarks (softmax_kl, pearson, cka, gram_l2, multiscale_pool):

    PROVIDERS = common.op_providers(autokd_fn, reference_fn)  # eager, compiled, autokd

    @common.parametrize_op(CASES, PROVIDERS)
    def test_<op>(benchmark, provider, mode, case, device):
        common.run_op(benchmark, "<op>", provider, PROVIDERS[provider], make_inputs(case, device),
                      mode=mode, device=device, case=case, grad=(0,))

``run_op`` times the forward (no autograd), the backward alone (the forward of each round run
untimed in pytest-benchmark's ``setup``) or both, in a group ``"<op> <device> <case> <mode>"``
so that pytest-benchmark's table compares the providers of one case, and records in
``benchmark.extra_info``: input_bytes, peak_bytes (one call, above what was live before),
workspace_bytes (peak_bytes beyond the tensors the call must hand back: its output, and the
input gradients when it runs a backward), and on request the forward's copy_fraction (bytes
moved per second over a plain copy's) and in_cache_fraction (the same with the inputs in
cache, CPU autokd only; see in_cache_fraction below).

Optimizer-step benchmarks (masked_sgd_step, masked_adamw_step): parameter sets of the CIFAR
ResNets (``make_step_inputs``), torch's foreach optimizers followed by mask multiplies
(``optimizer_then_mask``), ``run_step`` for pytest-benchmark and ``step_table_main`` for the
interleaved markdown table of a script run.

Speed figures are medians and ratios against a reference measured in the same run (machines
here are shared and noisy); see benchmarks/RESULTS.md for the recorded figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import autokd

HAS_CUDA = torch.cuda.is_available() and autokd.ops.WITH_CUDA
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
MODES = ("fwd", "bwd", "fwd+bwd")

# Every (case, mode, device) is its own static graph of the compiled reference: more than
# dynamo's default cache allows, which would silently fall back to eager.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 256

# Rounds of one case: as many as fit ROUND_BUDGET_S seconds, within [MIN_ROUNDS, MAX_ROUNDS].
ROUND_BUDGET_S = 0.5
MIN_ROUNDS, MAX_ROUNDS = 7, 200


# -- measuring tools --------------------------------------------------------------------------


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(
    fn: Callable[[], object], repeats: int, warmup: int = 0, device: str = "cpu"
) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated by torch during one call of ``fn``, above what was live before.

    CUDA uses the caching allocator's counters. CPU replays the profiler's per-event memory
    (``profile_memory=True``) in time order and keeps the running maximum.
    """
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # In this torch an allocation made inside an op is reported as that op's *self* memory (only
    # frees and allocations outside ops are "[memory]" events). Allocations count from their
    # event's start and frees from its end, which bounds the true peak from above.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (
            e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
            e.self_cpu_memory_usage,
        )
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
    return median_seconds(lambda: dst.copy_(src), repeats, device=device)


def bandwidth_fraction(bytes_moved: int, seconds: float, device: str = "cpu") -> float:
    """Bytes moved per second as a fraction of a plain copy moving the same bytes.

    A copy of b bytes reads b and writes b; an op that reads b bytes and writes little moves b,
    so it is compared with a copy of b/2 bytes (which also moves b).
    """
    ref = copy_seconds(max(bytes_moved // 2, 1), device=device)
    return ref / seconds if seconds > 0 else float("nan")


def in_cache_fraction(
    fn: Callable[..., object],
    inputs: tuple,
    bytes_moved: int,
    cache_bytes: int = 512 * 1024,
    repeats: int = 31,
) -> float:
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
        fixed = median_seconds(lambda: fn(*corner), repeats)
        per_slice = max(median_seconds(lambda: fn(*small), repeats) - fixed, 0.0)
    seconds = fixed + per_slice * rows / k
    return copy_seconds(max(bytes_moved // 2, 1)) / seconds


# -- kernel benchmarks ------------------------------------------------------------------------


def op_providers(autokd_fn: Callable, reference: Callable) -> dict[str, Callable]:
    """The three providers every kernel is compared with: its eager reference, that reference
    under ``torch.compile`` (static shapes; compiled on its first call, so collecting or
    running ``-k "not compiled"`` compiles nothing) and the autokd op."""
    return {
        "eager": reference,
        "compiled": torch.compile(reference, dynamic=False),
        "autokd": autokd_fn,
    }


def parametrize_op(cases: Mapping, providers: Mapping):
    """The parameters of a kernel benchmark, ids ``provider-mode-case-device``."""

    def wrap(fn):
        # Applied innermost first: the first one applied comes first in the id.
        fn = pytest.mark.parametrize("provider", list(providers))(fn)
        fn = pytest.mark.parametrize("mode", MODES)(fn)
        fn = pytest.mark.parametrize("case", list(cases))(fn)
        return pytest.mark.parametrize("device", DEVICES)(fn)

    return wrap


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rounds(fn: Callable[[], object], device: str) -> int:
    t = median_seconds(fn, 3, device=device)
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_BUDGET_S / max(t, 1e-9))))


def run_op(
    benchmark,
    op: str,
    provider: str,
    fn: Callable[..., torch.Tensor],
    inputs: Sequence,
    *,
    mode: str,
    device: str,
    case: str,
    grad: Sequence[int] = (0,),
    bandwidth: bool = False,
    in_cache: bool = False,
) -> None:
    """Time ``fn(*inputs)`` (one tensor out) in ``mode`` and record its costs (module doc).

    grad: positions in ``inputs`` of the tensors that require grad in the backward modes.
    bandwidth: record the forward's copy_fraction, counting input and output bytes as moved.
    in_cache: record in_cache_fraction too (CPU, autokd provider, forward).
    """
    if mode not in MODES:
        raise ValueError(f"run_op: expected mode in {MODES}, got {mode!r}")
    inputs = list(inputs)
    benchmark.group = f"{op} {device} {case} {mode}"
    input_bytes = sum(_nbytes(x) for x in inputs if isinstance(x, torch.Tensor))
    if mode == "fwd":

        def call():
            with torch.no_grad():
                out = fn(*inputs)
            sync(device)
            return out

        out_bytes = _nbytes(call())  # also the warm-up (and compilation)
        target, setup, measured, held = call, None, call, out_bytes
    else:
        leaves = [inputs[i].detach().requires_grad_(True) for i in grad]
        for i, leaf in zip(grad, leaves):
            inputs[i] = leaf
        grad_bytes = sum(_nbytes(x) for x in leaves)
        out = fn(*inputs)  # also the warm-up (and compilation) of the forward
        out_bytes = _nbytes(out)
        # A fixed upstream gradient: a loss's 1, or a seeded random one for a tensor output.
        upstream = (
            torch.ones_like(out)
            if out.dim() == 0
            else torch.randn(
                out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype
            ).to(out.device)
        )
        del out

        def backward(out):
            torch.autograd.grad(out, leaves, upstream)
            sync(device)

        if mode == "fwd+bwd":

            def call():
                backward(fn(*inputs))

            target, setup, measured, held = call, None, call, out_bytes + grad_bytes
        else:

            def setup():
                return (fn(*inputs),), {}

            target, held = backward, grad_bytes

    def once():
        if setup is None:
            target()
        else:
            args, _ = setup()
            target(*args)

    once()  # warm-up, and compilation of the backward for the compiled reference
    rounds = 1 if benchmark.disabled else _rounds(once, device)  # disabled: a smoke run
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    if mode == "bwd":  # the backward alone: the graph exists before the measured call
        args, _ = setup()
        peak = peak_memory_bytes(lambda: target(*args), device)
    else:
        peak = peak_memory_bytes(measured, device)
    benchmark.extra_info["input_bytes"] = input_bytes
    benchmark.extra_info["peak_bytes"] = peak
    benchmark.extra_info["workspace_bytes"] = peak - held
    if mode == "fwd" and benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        moved = input_bytes + out_bytes
        if bandwidth:
            benchmark.extra_info["copy_fraction"] = bandwidth_fraction(moved, median, device)
        if in_cache and device == "cpu" and provider == "autokd":
            where = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]

            def on_rows(*tensors):  # fn with its tensor inputs replaced by row slices
                args = list(inputs)
                for i, t in zip(where, tensors):
                    args[i] = t
                return fn(*args)

            benchmark.extra_info["in_cache_fraction"] = in_cache_fraction(
                on_rows, tuple(inputs[i] for i in where), moved
            )


# -- optimizer-step benchmarks ----------------------------------------------------------------


def resnet_cifar_shapes(depth: int, num_classes: int = 100) -> list[tuple[str, tuple, bool]]:
    """(name, shape, masked) for each parameter of the CIFAR ResNet-<depth> (He et al. 2016,
    option-A shortcuts, no projection weights; depth = 6n + 2). ResNet-20 has 0.28 M parameters
    in 59 tensors, ResNet-56 0.86 M in 167 (100 classes). The masked ones follow
    SparsityManager's default exclusions: every conv weight but the first; biases, BatchNorm and
    the last Linear stay dense."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    out = [
        ("conv1.weight", (16, 3, 3, 3), False),
        ("bn1.weight", (16,), False),
        ("bn1.bias", (16,), False),
    ]
    cin = 16
    for s, c in enumerate((16, 32, 64), start=1):
        for b in range(n):
            for k in (1, 2):
                pre = f"layer{s}.{b}"
                out.append((f"{pre}.conv{k}.weight", (c, cin if k == 1 else c, 3, 3), True))
                out.append((f"{pre}.bn{k}.weight", (c,), False))
                out.append((f"{pre}.bn{k}.bias", (c,), False))
            cin = c
    out += [("fc.weight", (num_classes, 64), False), ("fc.bias", (num_classes,), False)]
    return out


def make_step_inputs(
    depth: int, sparsity: float = 0.5, dtype=torch.float32, device="cpu", seed: int = 0
):
    """params, grads and masks (None for dense parameters) of ResNet-<depth>; each masked tensor
    keeps exactly round((1 - sparsity) * numel) weights, zeroed elsewhere."""
    g = torch.Generator().manual_seed(seed)
    params, grads, masks = [], [], []
    for _, shape, masked in resnet_cifar_shapes(depth):
        p = torch.randn(shape, generator=g, dtype=dtype) * 0.1
        gr = torch.randn(shape, generator=g, dtype=dtype) * 0.01
        m = None
        if masked:
            n = p.numel()
            flat = torch.zeros(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=g)[: round((1 - sparsity) * n)]] = True
            m = flat.view(shape)
            p.mul_(m)
        params.append(p.to(device))
        grads.append(gr.to(device))
        masks.append(None if m is None else m.to(device))
    return params, grads, masks


def optimizer_then_mask(
    opt_cls, hparams: dict, params, grads, masks, state_keys: Sequence[str] = ()
) -> Callable[[], None]:
    """One steady-state step of a torch optimizer (``foreach=True``) over ``params``; with
    ``state_keys``, followed by the mask multiplies of the masked weights and of those state
    buffers (what a masked step must equal); without, the dense step alone."""
    leaves = [torch.nn.Parameter(p) for p in params]
    for leaf, g in zip(leaves, grads):
        leaf.grad = g
    opt = opt_cls(leaves, foreach=True, **hparams)
    opt.step()  # creates the state
    if not state_keys:
        return opt.step
    sparse = [i for i, m in enumerate(masks) if m is not None]
    weights = [leaves[i] for i in sparse]
    buffers = [[opt.state[leaves[i]][k] for i in sparse] for k in state_keys]
    # Masks in the weights' dtype: the fastest form of the multiply here (a bool operand costs
    # a promotion per tensor).
    sm = [masks[i].to(params[0].dtype) for i in sparse]

    def step():
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(weights, sm)
            for b in buffers:
                torch._foreach_mul_(b, sm)

    return step


def run_step(benchmark, step: Callable[[], object], group: str, bytes_moved: int) -> None:
    """Time an optimizer step; record bytes_moved, GB/s and fraction_of_copy_bandwidth."""
    step()
    benchmark.group = group
    benchmark.extra_info["bytes_moved"] = bytes_moved
    benchmark(step)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = bytes_moved / median / 1e9
        benchmark.extra_info["fraction_of_copy_bandwidth"] = bandwidth_fraction(bytes_moved, median)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 5
) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds so that load
    from other processes on a shared machine hits every function alike."""
    per = max(repeats // rounds, 1)
    got: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            got[k].append(median_seconds(fn, per, warmup=3))
    return {k: sorted(v)[len(v) // 2] for k, v in got.items()}


def step_table_main(
    doc: str,
    build: Callable[[str, int], Callable[[], object]],
    bytes_moved: Callable[[int], int],
    impls: Sequence[str],
    depths: Sequence[int],
    baseline: str,
    loop: str,
    argv: Sequence[str] | None = None,
) -> None:
    """Script mode of an optimizer-step benchmark: a markdown table per parameter set with each
    impl's median, its ratios to ``baseline`` and ``loop`` and its bytes/s against a plain copy
    of the same bytes, all timed in the same interleaved rounds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| params | impl | median us | vs foreach_then_mask | vs python_loop | GB/s | of copy bw |"
    )
    print("|---|---|---|---|---|---|---|")
    for depth in depths:
        nbytes = bytes_moved(depth)
        # The yardstick: a plain copy moving nbytes in all (reads and writes nbytes / 2).
        src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8).random_(0, 255)
        fns = {i: build(i, depth) for i in impls}
        copy = torch.empty_like(src).copy_
        med = interleaved_medians(
            dict(fns, copy=lambda copy=copy, src=src: copy(src)), args.repeats
        )
        for name in fns:
            t = med[name]
            print(
                f"| ResNet-{depth} | {name} | {t * 1e6:.0f} | {med[baseline] / t:.2f}x | "
                f"{med[loop] / t:.2f}x | {nbytes / t / 1e9:.1f} | {med['copy'] / t:.2f} |"
            )
