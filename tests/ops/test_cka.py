"""autokd::cka against its eager reference, plus the op's contract (opcheck, gradcheck,
compile, properties, input errors, CUDA precision)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autokd.ops import cka
from autokd.reference import cka as ref_cka
from helpers import assert_low_precision_close, raises_value_error

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-6)}

# (N, Dx, Dy): odd sizes, size-1 feature dims, Dx != Dy; N >= 4 so both estimators apply.
CASES = [(4, 3, 5), (7, 1, 9), (9, 6, 1), (33, 17, 40), (5, 64, 2)]


def make(n, d, dtype, contiguous=True, device="cpu"):
    if contiguous:
        return torch.randn(n, d, dtype=dtype, device=device)
    return torch.randn(d, n, dtype=dtype, device=device).T  # non-contiguous view


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("n,dx,dy", CASES)
def test_matches_reference(n, dx, dy, contiguous, dtype, debiased):
    x = make(n, dx, dtype, contiguous).requires_grad_()
    y = make(n, dy, dtype, contiguous).requires_grad_()
    xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    out, ref = cka(x, y, debiased), ref_cka(xr, yr, debiased)
    assert out.shape == () and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn((), dtype=dtype)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **TOL[dtype])
    torch.testing.assert_close(y.grad, yr.grad, **TOL[dtype])


def test_biased_two_samples():
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(cka(x, y), ref_cka(x, y))


def test_one_sided_gradient():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64)
    cka(x, y).backward()
    assert x.grad is not None and y.grad is None


@pytest.mark.parametrize("debiased", [False, True])
def test_opcheck(debiased):
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.randn(6, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.autokd.cka.default, (x, y, debiased))
    _, gram_grad = torch.ops.autokd.cka.default(x, y, debiased)
    torch.library.opcheck(
        torch.ops.autokd.cka_backward.default,
        (torch.tensor(0.3), gram_grad, x.detach(), y.detach()),
    )


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,dx,dy", [(4, 3, 2), (7, 1, 5), (9, 6, 4)])
def test_gradcheck(n, dx, dy, debiased):
    x = torch.randn(n, dx, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dy, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cka(a, b, debiased), (x, y))


def test_compile_fullgraph():
    x = torch.randn(16, 12, requires_grad=True)
    y = torch.randn(16, 5, requires_grad=True)

    @torch.compile(fullgraph=True)
    def loss(a, b):
        return 1.0 - cka(a, b, True)

    out = loss(x, y)
    out.backward()
    xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    ref = 1.0 - ref_cka(xr, yr, True)
    ref.backward()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])
    torch.testing.assert_close(y.grad, yr.grad, **TOL[torch.float32])


@settings(max_examples=25, deadline=None)
@given(
    st.integers(6, 24), st.integers(1, 12), st.integers(1, 12), st.floats(0.05, 20.0), st.booleans()
)
def test_properties(n, dx, dy, scale, debiased):
    x = torch.randn(n, dx, dtype=torch.float64)
    y = torch.randn(n, dy, dtype=torch.float64)
    base = cka(x, y, debiased)
    # Biased CKA lies in [0, 1]; the debiased one in [-1, 1] (an inner product of projections).
    lo = -1.0 if debiased else 0.0
    assert lo - 1e-12 <= base.item() <= 1.0 + 1e-12
    torch.testing.assert_close(cka(x, x, debiased), torch.tensor(1.0, dtype=torch.float64))
    # Invariant to isotropic scaling and to orthogonal transforms of either feature space.
    q, _ = torch.linalg.qr(torch.randn(dx, dx, dtype=torch.float64))
    torch.testing.assert_close(cka(x * scale, y, debiased), base, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cka(x @ q, y / scale, debiased), base, rtol=1e-9, atol=1e-12)
    # Symmetric in its arguments.
    torch.testing.assert_close(cka(y, x, debiased), base, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(base, ref_cka(x, y, debiased), rtol=1e-9, atol=1e-12)


def test_degenerate_features_give_zero():
    x = torch.ones(5, 3, dtype=torch.float64)  # every sample identical: centred Gram is 0
    y = torch.randn(5, 2, dtype=torch.float64)
    assert cka(x, y).item() == 0.0
    torch.testing.assert_close(cka(x, y), ref_cka(x, y))


def test_bad_inputs():
    x = torch.randn(6, 5)
    raises_value_error(
        cka, r"autokd::cka: expected x of shape \[N, Dx\], got \[6, 5, 1\]", x[..., None], x
    )
    raises_value_error(cka, r"autokd::cka: expected y of shape \[N, Dy\], got \[6\]", x, x[:, 0])
    raises_value_error(
        cka, r"expected y with the same N \(dim 0\) as x \(6\), got \[5, 5\]", x, x[:5]
    )
    raises_value_error(cka, r"expected x to be non-empty, got shape \[6, 0\]", x[:, :0], x)
    raises_value_error(cka, r"expected y to be non-empty, got shape \[6, 0\]", x, x[:, :0])
    raises_value_error(
        cka, r"expected x with N >= 4 samples \(debiased HSIC\), got \[3, 5\]", x[:3], x[:3], True
    )
    raises_value_error(cka, r"expected x with N >= 2 samples, got \[1, 5\]", x[:1], x[:1], False)
    raises_value_error(
        cka, r"expected y of the same dtype as x \(Float\), got Double", x, x.double()
    )
    raises_value_error(
        cka, r"expected x to be a floating-point tensor .*, got Int", x.int(), x.int()
    )
    raises_value_error(cka, r"autokd::cka: expected debiased to be a bool, got 'yes'", x, x, "yes")


def test_cpu_half_computes_in_float32():
    x, y = torch.randn(12, 40), torch.randn(12, 30)
    for dtype in (torch.bfloat16, torch.float16):
        xh, yh = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
        out = cka(xh, yh, True)
        out.backward()
        x32, y32 = xh.detach().float().requires_grad_(), yh.detach().float().requires_grad_()
        ref = ref_cka(x32, y32, True)
        ref.backward()
        assert out.dtype == dtype and xh.grad.dtype == dtype and yh.grad.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(xh.grad.float(), x32.grad, rtol=2e-2, atol=1e-3)


def test_backward_fills_no_zero_gram_grad():
    # gram_grad is a non-differentiable output: autograd must not build a zero [2, N, N]
    # gradient for it on every backward.
    x = torch.randn(32, 8, requires_grad=True)
    y = torch.randn(32, 5, requires_grad=True)
    loss = cka(x, y)
    with torch.profiler.profile() as prof:
        loss.backward()
    assert not {e.name for e in prof.events()} & {"aten::zeros", "aten::zero_"}
    assert x.grad is not None and y.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("n,dx,dy", CASES + [(256, 1024, 512)])
def test_cuda_matches_reference(n, dx, dy, contiguous, debiased):
    for dtype in (torch.float32, torch.float64):
        x = make(n, dx, dtype, contiguous, "cuda").requires_grad_()
        y = make(n, dy, dtype, contiguous, "cuda").requires_grad_()
        xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        out, ref = cka(x, y, debiased), ref_cka(xr, yr, debiased)
        tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(out, ref, **tol)
        out.backward()
        ref.backward()
        torch.testing.assert_close(x.grad, xr.grad, **tol)
        torch.testing.assert_close(y.grad, yr.grad, **tol)


@pytest.mark.cuda
def test_cuda_opcheck():
    x = torch.randn(9, 20, device="cuda", requires_grad=True)
    y = torch.randn(9, 7, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.autokd.cka.default, (x, y, True))


@pytest.mark.cuda
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype, debiased):
    # Scaled so that the half-precision reference's HSIC sums stay finite in float16.
    x_lo = (0.05 * torch.randn(128, 1024, device="cuda")).to(dtype)
    y_lo = (0.05 * torch.randn(128, 256, device="cuda")).to(dtype)
    x_tr, y_tr = x_lo.float().requires_grad_(), y_lo.float().requires_grad_()
    truth = ref_cka(x_tr, y_tr, debiased)
    truth.backward()
    xa, ya = x_lo.clone().requires_grad_(), y_lo.clone().requires_grad_()
    out = cka(xa, ya, debiased)
    out.backward()
    xr, yr = x_lo.clone().requires_grad_(), y_lo.clone().requires_grad_()
    ref_lo = ref_cka(xr, yr, debiased)
    ref_lo.backward()
    assert out.dtype == dtype and xa.grad.dtype == dtype
    assert_low_precision_close(out, truth, ref_lo, floor=torch.finfo(dtype).eps)
    for got, ref, tr in ((xa.grad, xr.grad, x_tr.grad), (ya.grad, yr.grad, y_tr.grad)):
        assert_low_precision_close(got, tr, ref, reduce="norm")
