"""autokd::pearson against its eager reference: values, gradients, layouts, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autokd
from autokd.reference import pearson as reference
from helpers import assert_low_precision_close

op = autokd.ops.pearson

LAYOUTS = {
    "contiguous": lambda x: x,
    "transposed": lambda x: x.t().contiguous().t(),  # column-major [N, K]
    "sliced": lambda x: x[:, ::2],
}
# No dim of 2: two centred values are always collinear (corr = +-1 exactly), so the true
# gradient is eps-sized and any kernel returns the rounding of two cancelling terms.
SHAPES = [(7, 13), (1, 5), (5, 1), (1, 1), (3, 4), (128, 100), (33, 1000)]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=2e-6)}


def _source_shape(shape, layout):
    return (shape[0], 2 * shape[1]) if layout == "sliced" else shape


def _check(sx, tx, tau, dtype, weights=(0.7, 1.3), tol=None):
    """sx, tx: the op's inputs (any layout) built from the leaf sx_leaf (sx._base or sx)."""
    leaf = sx.detach().clone().requires_grad_()
    got = op(leaf, tx, tau)
    assert all(g.dtype == dtype and g.shape == () for g in got)
    (grad,) = torch.autograd.grad(weights[0] * got[0] + weights[1] * got[1], leaf)
    s64 = sx.detach().double().requires_grad_()
    want = reference(s64, tx.double(), tau)
    (want_grad,) = torch.autograd.grad(weights[0] * want[0] + weights[1] * want[1], s64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **(tol or TOL[dtype]))
    scale = want_grad.abs().max().item() + 1e-30
    torch.testing.assert_close(grad.double() / scale, want_grad / scale, **(tol or TOL[dtype]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, layout, dtype):
    src = _source_shape(shape, layout)
    s = LAYOUTS[layout](torch.randn(src, dtype=dtype) * 3)
    t = LAYOUTS[layout](torch.randn(src, dtype=dtype) * 3)
    _check(s, t, 2.0, dtype)


def test_strided_input_gradient_flows_to_view():
    base = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    inter, intra = op(base[:, ::2], t, 4.0)
    (inter + intra).backward()
    b2 = base.detach().clone().requires_grad_()
    w = reference(b2[:, ::2], t, 4.0)
    (w[0] + w[1]).backward()
    torch.testing.assert_close(base.grad, b2.grad)


@pytest.mark.parametrize("tau", [1.0, 4.0, 8.0])
def test_confident_and_flat_predictions(tau):
    # A confident teacher (column means far from 1/K) and a near-flat student.
    t = torch.randn(64, 50, dtype=torch.float64)
    t[:, 3] += 12
    s = torch.randn(64, 50, dtype=torch.float64) * 0.05
    _check(s, t, tau, torch.float64, tol=dict(rtol=1e-6, atol=1e-9))
    # Ill-conditioned in float32 (columns of ~1e-6 teacher probabilities): hold the kernel to
    # the float32 reference's own error instead.
    s64 = s.clone().requires_grad_()
    want = reference(s64, t, tau)
    (want_grad,) = torch.autograd.grad(want[0] + want[1], s64)
    outs = []
    for fn in (op, reference):
        s32 = s.float().requires_grad_()
        got = fn(s32, t.float(), tau)
        outs.append((got, torch.autograd.grad(got[0] + got[1], s32)[0]))
    (got, grad), (ref32, ref_grad) = outs
    for g, w, r in zip(got, want, ref32):
        assert_low_precision_close(g, w, r)
    assert_low_precision_close(grad, want_grad, ref_grad)


def test_perfect_agreement_gives_zero():
    x = torch.randn(32, 20)
    inter, intra = op(x, x, 2.0)
    assert abs(inter.item()) < 1e-5 and abs(intra.item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    s32 = torch.randn(64, 100) * 3
    t32 = torch.randn(64, 100) * 3
    want = reference(s32.double(), t32.double(), 2.0)
    got = op(s32.to(dtype), t32.to(dtype), 2.0)
    ref_low = reference(s32.to(dtype), t32.to(dtype), 2.0)
    for g, w, r in zip(got, want, ref_low):
        assert g.dtype == dtype
        assert_low_precision_close(g, w, r)


def test_teacher_gets_no_gradient():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    sum(op(s, t, 2.0)).backward()
    assert s.grad is not None and t.grad is None


def test_only_one_output_used():
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, dtype=torch.float64)
    op(s, t, 2.0)[1].backward()
    s2 = s.detach().clone().requires_grad_()
    reference(s2, t, 2.0)[1].backward()
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (
            torch.randn(6, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(6, 5, dtype=torch.float64),
        ),
        lambda: (torch.randn(9, 4).t().requires_grad_(), torch.randn(4, 9)),
    ],
    ids=["contiguous", "transposed"],
)
def test_opcheck(make):
    s, t = make()
    torch.library.opcheck(torch.ops.autokd.pearson.default, (s, t, 2.0))


def test_gradcheck():
    s = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: op(x, t, 2.0), (s,))
    strided = torch.randn(8, 3, dtype=torch.float64).t().requires_grad_()  # [3, 8]
    t2 = torch.randn(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: op(x, t2, 1.5), (strided,))


def test_torch_compile_fullgraph():
    s = torch.randn(16, 10, requires_grad=True)
    t = torch.randn(16, 10)

    @torch.compile(fullgraph=True)
    def loss(s, t):
        inter, intra = op(s, t, 4.0)
        return inter + 2 * intra

    out = loss(s, t)
    out.backward()
    s2 = s.detach().clone().requires_grad_()
    inter, intra = reference(s2, t, 4.0)
    want = inter + 2 * intra
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40).filter(lambda v: v != 2),  # 2: degenerate, see SHAPES
    k=st.integers(1, 300).filter(lambda v: v != 2),
    transpose=st.booleans(),
    tau=st.floats(0.25, 8.0),
    w=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
)
def test_property_random_shapes(n, k, transpose, tau, w):
    s = torch.randn(n, k, dtype=torch.float64) * 3
    t = torch.randn(n, k, dtype=torch.float64) * 3
    if transpose:
        s, t = s.t().contiguous().t(), t.t().contiguous().t()
    _check(s, t, tau, torch.float64, weights=w)
    inter, intra = op(s, t, tau)
    # 1 - corr lies in [0, 2]
    for v in (inter.item(), intra.item()):
        assert -1e-9 <= v <= 2 * tau * tau + 1e-9


BAD = [
    (
        "rank 1",
        lambda: (torch.randn(5), torch.randn(5), 1.0),
        r"autokd::pearson: expected student of shape \[N, K\], got \[5\]",
    ),
    (
        "rank 3",
        lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4), 1.0),
        r"autokd::pearson: expected student of shape \[N, K\], got \[2, 3, 4\]",
    ),
    (
        "shapes",
        lambda: (torch.randn(4, 5), torch.randn(5, 4), 1.0),
        r"autokd::pearson: expected teacher of the same shape as student \[4, 5\], got \[5, 4\]",
    ),
    (
        "tau 0",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), 0.0),
        r"autokd::pearson: expected tau > 0 and finite, got 0",
    ),
    (
        "tau < 0",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), -1.0),
        r"expected tau > 0 and finite, got -1",
    ),
    (
        "tau inf",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), math.inf),
        r"expected tau > 0 and finite, got inf",
    ),
    (
        "empty",
        lambda: (torch.randn(4, 0), torch.randn(4, 0), 1.0),
        r"autokd::pearson: expected student to be non-empty, got shape \[4, 0\]",
    ),
    (
        "dtypes",
        lambda: (torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5), 1.0),
        r"autokd::pearson: expected teacher of the same dtype as student \(Double\), got Float",
    ),
    (
        "integer",
        lambda: (torch.ones(4, 5, dtype=torch.int32), torch.ones(4, 5, dtype=torch.int32), 1.0),
        r"autokd::pearson: expected student to be a floating-point tensor .*, got Int",
    ),
]


@pytest.mark.parametrize("args, message", [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        op(*args())


def test_bad_grads():
    s = torch.randn(4, 5)
    with pytest.raises(
        ValueError,
        match=r"autokd::pearson_backward: expected grad_intra with "
        r"one element, got shape \[3\]",
    ):
        torch.ops.autokd.pearson_backward(torch.ones(()), torch.ones(3), s, s, 1.0)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 100), (256, 1000), (3, 7)], ids=str)
def test_cuda_matches_reference(shape, dtype):
    s = torch.randn(shape, device="cuda") * 3
    t = torch.randn(shape, device="cuda") * 3
    s64 = s.double().requires_grad_()
    want = reference(s64, t.double(), 2.0)
    (want_grad,) = torch.autograd.grad(want[0] + 0.5 * want[1], s64)
    sl = s.to(dtype).requires_grad_()
    got = op(sl, t.to(dtype), 2.0)
    (grad,) = torch.autograd.grad(got[0] + 0.5 * got[1], sl)
    sr = s.to(dtype).requires_grad_()
    ref_low = reference(sr, t.to(dtype), 2.0)
    (ref_grad,) = torch.autograd.grad(ref_low[0] + 0.5 * ref_low[1], sr)
    assert grad.dtype == dtype
    if dtype == torch.float32:
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
        scale = want_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, want_grad / scale, rtol=1e-4, atol=1e-5)
    else:
        for g, w, r in zip(got, want, ref_low):
            assert_low_precision_close(g, w, r)
        assert_low_precision_close(grad, want_grad, ref_grad)


@pytest.mark.cuda
def test_cuda_float64_strided_and_opcheck():
    s = torch.randn(9, 6, device="cuda", dtype=torch.float64).t().requires_grad_()
    t = torch.randn(6, 9, device="cuda", dtype=torch.float64)
    for g, w in zip(op(s, t, 2.0), reference(s, t, 2.0)):
        torch.testing.assert_close(g, w)
    torch.library.opcheck(torch.ops.autokd.pearson.default, (s, t, 2.0))


@pytest.mark.cuda
def test_cuda_mixed_devices():
    with pytest.raises(
        ValueError,
        match=r"autokd::pearson: expected teacher on the same "
        r"device as student \(cuda:0\), got cpu",
    ):
        op(torch.randn(4, 5, device="cuda"), torch.randn(4, 5), 1.0)


@pytest.mark.parametrize("n", [31, 32, 200])
def test_float32_fused_rows_confident_class(n):
    # Contiguous float32 rows take the fused pass, whose column sums are float partials added
    # into double every 32 rows: blocks end exactly at, before and after a range's last row.
    # A class every sample is sure of (p ~ 1) and one nobody predicts (p ~ 0) are the columns
    # where a raw (unshifted) float sum would cancel. Column-major copies of the same values
    # take the unfused pass (double column sums throughout): their losses must agree, and both
    # gradients must stay within a few times the float32 reference's error of the float64
    # truth. (The gradients are not compared with each other: at p ~ 1 and p ~ 1e-15 they are
    # ill-conditioned in float32, ~1e-2 of their scale off the truth for the reference too,
    # and the two passes sum their rows in different orders.)
    s = torch.randn(n, 57) * 2
    t = torch.randn(n, 57) * 2
    s[:, 3] += 25
    t[:, 3] += 25
    s[:, 9] -= 25
    t[:, 9] -= 25

    def run(fn, x, y):
        x = x.detach().clone().requires_grad_()
        out = fn(x, y, 1.5)
        (grad,) = torch.autograd.grad(0.7 * out[0] + 1.3 * out[1], x)
        return torch.stack([o.double() for o in out]), grad.double()

    want, want_grad = run(reference, s.double(), t.double())
    ref_out, ref_grad = run(reference, s, t)
    fused, fused_grad = run(op, s, t)
    unfused, unfused_grad = run(op, s.t().contiguous().t(), t.t().contiguous().t())
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-7)
    for got, truth, ref in (
        (fused, want, ref_out),
        (fused_grad, want_grad, ref_grad),
        (unfused_grad, want_grad, ref_grad),
    ):
        err = (got - truth).abs().max().item()
        ref_err = (ref - truth).abs().max().item()
        # Both passes land a few reference errors from the truth (measured 0.5-3x here); a lost
        # or doubled column block would be far beyond 8x.
        assert err <= 8 * ref_err + 1e-6 * truth.abs().max().item(), (err, ref_err)
