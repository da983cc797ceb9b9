"""autokd::masked_sgd_step: parity with its eager reference and with torch.optim.SGD, exact zeros
under the mask, opcheck, torch.compile, and input errors."""

import pytest
import torch

import autokd
from autokd.reference import masked_sgd_step as ref_step
from helpers import assert_low_precision_close, clone_all, raises_value_error

op = torch.ops.autokd.masked_sgd_step.default

SHAPES = [(16, 3, 3, 3), (7,), (1, 1), (33, 1, 5), (130, 257)]  # last: several CPU spans


def _make(shapes, dtype, device="cpu", mask_p=0.5, with_none=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    params = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    masks = [(torch.rand(s, generator=g) > mask_p).to(device) for s in shapes]
    if with_none:
        masks[1] = None  # a dense parameter in the same call
    bufs = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    return params, grads, masks, bufs


CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True),
    dict(momentum=0.5, dampening=0.3, weight_decay=0.0, nesterov=False),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(cfg, first_step, dtype):
    params, grads, masks, bufs = _make(SHAPES, dtype)
    p2, b2 = clone_all(params), clone_all(bufs)
    autokd.ops.masked_sgd_step(params, grads, masks, bufs, 0.05, first_step=first_step, **cfg)
    ref_step(p2, grads, masks, b2, 0.05, first_step=first_step, **cfg)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b, **tol)
    if cfg["momentum"] != 0:
        for a, b in zip(bufs, b2):
            torch.testing.assert_close(a, b, **tol)


def test_half_precision_error_bounded_by_reference():
    # fp16 kernel vs fp32 reference: at most 2x the error of the reference run in fp16.
    params, grads, masks, bufs = _make(SHAPES, torch.float32)
    cfg = dict(momentum=0.9, weight_decay=1e-3, nesterov=True)
    gold_p, gold_b = clone_all(params), clone_all(bufs)
    ref_step(gold_p, grads, masks, gold_b, 0.1, **cfg)
    h = lambda ts: [None if t is None else t.half() for t in ts]  # noqa: E731
    kp, kb, rp, rb = h(params), h(bufs), h(params), h(bufs)
    autokd.ops.masked_sgd_step(kp, h(grads), masks, kb, 0.1, **cfg)
    ref_step(rp, h(grads), masks, rb, 0.1, **cfg)
    for gold, k, r in zip(gold_p, kp, rp):
        assert_low_precision_close(k, gold, r, floor=1e-6)


def test_non_contiguous_grads_and_masks():
    base = torch.randn(12, 10, dtype=torch.float64)
    grad = torch.randn(10, 12, dtype=torch.float64).t()  # [12, 10] transposed view
    mask = (torch.rand(10, 12) > 0.5).t()
    assert not grad.is_contiguous() and not mask.is_contiguous()
    p1, p2 = base.clone(), base.clone()
    b1, b2 = torch.zeros_like(base), torch.zeros_like(base)
    autokd.ops.masked_sgd_step([p1], [grad], [mask], [b1], 0.1, 0.9, 0.0, 1e-2, False, True)
    ref_step([p2], [grad], [mask], [b2], 0.1, 0.9, 0.0, 1e-2, False, True)
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cfg", CONFIGS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_ones_mask_equals_torch_sgd_over_many_steps(cfg, dtype):
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 64), (10,)]
    g = torch.Generator().manual_seed(1)
    ours = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    bufs = [torch.empty_like(p).fill_(float("nan")) for p in ours]  # first step must not read
    opt = torch.optim.SGD(theirs, lr=0.05, **cfg)
    for step in range(100):
        grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        for p, gr in zip(theirs, grads):
            p.grad = gr.clone()
        opt.step()
        autokd.ops.masked_sgd_step(ours, grads, masks, bufs, 0.05, first_step=step == 0, **cfg)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), **tol)


def test_pruned_weights_and_momentum_stay_exactly_zero():
    params, grads, masks, bufs = _make(SHAPES, torch.float32, with_none=False)
    for step in range(50):
        grads = [torch.randn_like(p) for p in params]
        for gr, m in zip(grads, masks):
            gr[~m] = float("nan") if step % 2 else float("inf")  # ignored, never leaks
        autokd.ops.masked_sgd_step(params, grads, masks, bufs, 0.1, 0.9, 0.0, 5e-4, True, step == 0)
        for p, b, m in zip(params, bufs, masks):
            assert torch.all(p[~m] == 0) and torch.all(b[~m] == 0)
            assert torch.isfinite(p).all() and torch.isfinite(b).all()
            # signbit: "exactly zero" is +0.0, not a -0.0 left by a multiply
            assert not torch.signbit(p[~m]).any()


def test_without_momentum_buffers_may_be_empty():
    params, grads, masks, _ = _make(SHAPES, torch.float64)
    p2 = clone_all(params)
    autokd.ops.masked_sgd_step(params, grads, masks, [], 0.1, weight_decay=1e-2)
    ref_step(p2, grads, masks, [], 0.1, weight_decay=1e-2)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b)


def test_empty_list_and_empty_tensor():
    autokd.ops.masked_sgd_step([], [], [], [], 0.1, 0.9)
    p = torch.zeros(0, 3)
    autokd.ops.masked_sgd_step([p], [p.clone()], [None], [p.clone()], 0.1, 0.9)


def test_opcheck():
    params, grads, masks, bufs = _make(SHAPES[:3], torch.float32)
    args = (params, grads, masks, bufs, 0.1, 0.9, 0.0, 1e-4, True, False)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    params, grads, masks, bufs = _make(SHAPES[:3], torch.float32)
    p2, b2 = clone_all(params), clone_all(bufs)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps, gs, ms, bs):
        autokd.ops.masked_sgd_step(ps, gs, ms, bs, 0.1, 0.9, 0.0, 1e-4, False, False)

    step(params, grads, masks, bufs)
    ref_step(p2, grads, masks, b2, 0.1, 0.9, 0.0, 1e-4, False, False)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b)


def test_errors():
    p = [torch.zeros(4, 3), torch.zeros(5)]
    g = [torch.zeros(4, 3), torch.zeros(5)]
    b = [torch.zeros(4, 3), torch.zeros(5)]
    ok_m = [torch.ones(4, 3, dtype=torch.bool), None]
    h = (0.1, 0.9, 0.0, 0.0, False, False)
    pre = r"autokd::masked_sgd_step: expected "
    raises_value_error(
        op,
        pre + r"masks\[0\] of the same shape as params\[0\] \[4, 3\], got \[3, 4\]",
        p,
        g,
        [torch.ones(3, 4, dtype=torch.bool), None],
        b,
        *h,
    )
    raises_value_error(
        op, pre + r"masks\[0\] of dtype Bool, got Float", p, g, [torch.ones(4, 3), None], b, *h
    )
    raises_value_error(op, pre + r"grads of length 2 \(as params\), got 1", p, g[:1], ok_m, b, *h)
    raises_value_error(op, pre + r"masks of length 2 \(as params\), got 1", p, g, ok_m[:1], b, *h)
    raises_value_error(
        op, pre + r"momentum_buffers of length 2 \(as params\), got 1", p, g, ok_m, b[:1], *h
    )
    raises_value_error(
        op,
        pre + r"params\[0\] to be a floating-point tensor .*, got Long",
        [torch.zeros(4, 3, dtype=torch.long)],
        [torch.zeros(4, 3, dtype=torch.long)],
        [None],
        [torch.zeros(4, 3, dtype=torch.long)],
        *h,
    )
    raises_value_error(
        op,
        pre + r"params\[1\] of the same dtype as params\[0\] \(Float\), got Double",
        [p[0], p[1].double()],
        [g[0], g[1].double()],
        ok_m,
        [b[0], b[1].double()],
        *h,
    )
    raises_value_error(
        op,
        pre + r"grads\[1\] of the same shape as params\[1\] \[5\], got \[6\]",
        p,
        [g[0], torch.zeros(6)],
        ok_m,
        b,
        *h,
    )
    raises_value_error(
        op,
        pre + r"params\[0\] to be contiguous",
        [torch.zeros(3, 4).t()],
        [torch.zeros(4, 3)],
        [None],
        [torch.zeros(4, 3)],
        *h,
    )
    raises_value_error(
        op,
        pre + r"momentum > 0 and dampening == 0 with nesterov=True",
        p,
        g,
        ok_m,
        b,
        0.1,
        0.9,
        0.1,
        0.0,
        True,
        False,
    )
    raises_value_error(
        op, pre + r"lr >= 0 and finite, got -1", p, g, ok_m, b, -1.0, 0.9, 0.0, 0.0, False, False
    )


def test_error_parameters_on_different_devices():
    # A CPU tensor and a meta tensor in one call; the CPU kernel is called directly because
    # the dispatcher would route a list holding a meta tensor to the fake kernel.
    p = [torch.zeros(4), torch.zeros(4, device="meta")]
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(
        ValueError,
        match=r"expected params\[1\] on the same device as "
        r"params\[0\] \(cpu\), got meta",
    ):
        op.redispatch(
            ks,
            p,
            [torch.zeros(4), torch.zeros(4)],
            [None, None],
            [torch.zeros(4), torch.zeros(4)],
            0.1,
            0.9,
            0.0,
            0.0,
            False,
            False,
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    shapes = SHAPES + [(300, 1000)] + [(3, 3)] * 40  # several launches and a straddling tensor
    params, grads, masks, bufs = _make(shapes, dtype)
    cp, cg, cm, cb = (
        [None if t is None else t.cuda() for t in ts] for ts in (params, grads, masks, bufs)
    )
    for first in (True, False):
        autokd.ops.masked_sgd_step(params, grads, masks, bufs, 0.1, 0.9, 0.0, 1e-3, True, first)
        autokd.ops.masked_sgd_step(cp, cg, cm, cb, 0.1, 0.9, 0.0, 1e-3, True, first)
    tol = {} if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(params + bufs, cp + cb):
        torch.testing.assert_close(b.cpu(), a, **tol)


@pytest.mark.cuda
def test_cuda_error_parameters_on_different_devices():
    with pytest.raises(ValueError, match=r"expected params\[1\] on the same device as params"):
        op(
            [torch.zeros(4, device="cuda"), torch.zeros(4)],
            [torch.zeros(4, device="cuda"), torch.zeros(4)],
            [None, None],
            [torch.zeros(4, device="cuda"), torch.zeros(4)],
            0.1,
            0.9,
            0.0,
            0.0,
            False,
            False,
        )
