"""autokd::masked_adamw_step: parity with its eager reference and with torch.optim.AdamW, exact
zeros under the mask, opcheck, torch.compile, and input errors."""

import pytest
import torch

import autokd
from autokd.reference import masked_adamw_step as ref_step
from helpers import assert_low_precision_close, clone_all

op = torch.ops.autokd.masked_adamw_step.default

SHAPES = [(16, 3, 3, 3), (7,), (1, 1), (33, 1, 5), (130, 257)]


def _make(shapes, dtype, device="cpu", with_none=True):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    masks = [(torch.rand(s, generator=g) > 0.5).to(device) for s in shapes]
    if with_none:
        masks[1] = None
    m1 = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    m2 = [torch.rand(s, generator=g, dtype=dtype).to(device) for s in shapes]
    return params, grads, masks, m1, m2


CONFIGS = [
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    dict(beta1=0.0, beta2=0.5, eps=1e-3, weight_decay=0.0),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("step", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(cfg, step, dtype):
    params, grads, masks, m1, m2 = _make(SHAPES, dtype)
    p2, a2, b2 = clone_all(params), clone_all(m1), clone_all(m2)
    autokd.ops.masked_adamw_step(params, grads, masks, m1, m2, step, 1e-2, **cfg)
    ref_step(p2, grads, masks, a2, b2, step, 1e-2, **cfg)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for x, y in zip(params + m1 + m2, p2 + a2 + b2):
        torch.testing.assert_close(x, y, **tol)


def test_bfloat16_error_bounded_by_reference():
    params, grads, masks, m1, m2 = _make(SHAPES, torch.float32)
    gp = clone_all(params)
    ref_step(gp, grads, masks, clone_all(m1), clone_all(m2), 3, 1e-2)
    h = lambda ts: [None if t is None else t.bfloat16() for t in ts]  # noqa: E731
    kp, rp = h(params), h(params)
    autokd.ops.masked_adamw_step(kp, h(grads), masks, h(m1), h(m2), 3, 1e-2)
    ref_step(rp, h(grads), masks, h(m1), h(m2), 3, 1e-2)
    for gold, k, r in zip(gp, kp, rp):
        assert_low_precision_close(k, gold, r, floor=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_ones_mask_equals_torch_adamw_over_many_steps(cfg, dtype):
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 64), (10,)]
    g = torch.Generator().manual_seed(1)
    ours = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    m1 = [torch.zeros_like(p) for p in ours]
    m2 = [torch.zeros_like(p) for p in ours]
    opt = torch.optim.AdamW(
        theirs,
        lr=1e-2,
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
    )
    for step in range(1, 101):
        grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        for p, gr in zip(theirs, grads):
            p.grad = gr.clone()
        opt.step()
        autokd.ops.masked_adamw_step(ours, grads, masks, m1, m2, step, 1e-2, **cfg)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), **tol)
    for a, b in zip(m2, theirs):
        torch.testing.assert_close(a, opt.state[b]["exp_avg_sq"], **tol)


def test_pruned_weights_and_moments_stay_exactly_zero():
    params, grads, masks, m1, m2 = _make(SHAPES, torch.float32, with_none=False)
    for step in range(1, 51):
        grads = [torch.randn_like(p) for p in params]
        for gr, m in zip(grads, masks):
            gr[~m] = float("nan")
        autokd.ops.masked_adamw_step(params, grads, masks, m1, m2, step, 1e-2)
        for t in params + m1 + m2:
            assert torch.isfinite(t).all()
        for p, a, b, m in zip(params, m1, m2, masks):
            assert torch.all(p[~m] == 0) and torch.all(a[~m] == 0) and torch.all(b[~m] == 0)


def test_opcheck():
    params, grads, masks, m1, m2 = _make(SHAPES[:3], torch.float32)
    torch.library.opcheck(op, (params, grads, masks, m1, m2, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2))


def test_torch_compile_fullgraph():
    params, grads, masks, m1, m2 = _make(SHAPES[:3], torch.float32)
    p2, a2, b2 = clone_all(params), clone_all(m1), clone_all(m2)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps, gs, ms, a, b):
        autokd.ops.masked_adamw_step(ps, gs, ms, a, b, 2, 1e-3)

    step(params, grads, masks, m1, m2)
    ref_step(p2, grads, masks, a2, b2, 2, 1e-3)
    for x, y in zip(params + m1 + m2, p2 + a2 + b2):
        torch.testing.assert_close(x, y)


def test_errors():
    p = [torch.zeros(4, 3)]
    g = [torch.zeros(4, 3)]
    a = [torch.zeros(4, 3)]
    b = [torch.zeros(4, 3)]
    m = [torch.ones(4, 3, dtype=torch.bool)]
    h = (1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    pre = r"autokd::masked_adamw_step: expected "
    with pytest.raises(ValueError, match=pre + r"masks\[0\] of the same shape as params\[0\]"):
        op(p, g, [torch.ones(12, dtype=torch.bool)], a, b, *h)
    with pytest.raises(ValueError, match=pre + r"masks\[0\] of dtype Bool, got Half"):
        op(p, g, [torch.ones(4, 3, dtype=torch.half)], a, b, *h)
    with pytest.raises(ValueError, match=pre + r"exp_avg_sqs of length 1 \(as params\), got 0"):
        op(p, g, m, a, [], *h)
    with pytest.raises(ValueError, match=pre + r"exp_avgs\[0\] of the same dtype as params\[0\]"):
        op(p, g, m, [torch.zeros(4, 3, dtype=torch.float64)], b, *h)
    with pytest.raises(ValueError, match=pre + r"step >= 1 .*, got 0"):
        op(p, g, m, a, b, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(ValueError, match=pre + r"beta2 in \[0, 1\), got 1"):
        op(p, g, m, a, b, 1, 1e-3, 0.9, 1.0, 1e-8, 0.0)
    with pytest.raises(ValueError, match=pre + r"params\[0\] to be a floating-point tensor"):
        ints = [torch.zeros(4, 3, dtype=torch.int32)]
        op(ints, ints, m, ints, ints, *h)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_matches_cpu(dtype):
    shapes = SHAPES + [(300, 1000)] + [(3, 3)] * 40
    params, grads, masks, m1, m2 = _make(shapes, dtype)
    cuda = [[None if t is None else t.cuda() for t in ts] for ts in (params, grads, masks, m1, m2)]
    for step in (1, 2):
        autokd.ops.masked_adamw_step(params, grads, masks, m1, m2, step, 1e-2)
        autokd.ops.masked_adamw_step(*cuda, step, 1e-2)
    tol = {} if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-13)
    for x, y in zip(params + m1 + m2, cuda[0] + cuda[3] + cuda[4]):
        torch.testing.assert_close(y.cpu(), x, **tol)
