"""autokd::gram_l2 against its eager reference, plus the op's contract (opcheck, gradcheck,
compile, properties, input errors, CUDA precision)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autokd.ops import gram_l2
from autokd.reference import gram_l2 as ref_gram_l2
from helpers import assert_low_precision_close, raises_value_error

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-6)}

# (mode, student shape, teacher shape): odd sizes, size-1 dims, Ds != Dt, Ls != Lt.
CASES = [
    ("sample", (5, 7), (5, 3)),
    ("sample", (1, 4), (1, 9)),
    ("sample", (6, 1), (6, 1)),
    ("sample", (13, 33), (13, 17)),
    ("channel", (3, 5, 7), (3, 5, 2)),
    ("channel", (1, 1, 4), (1, 1, 3)),
    ("channel", (4, 6, 1), (4, 6, 9)),
    ("channel", (2, 9, 11), (2, 9, 11)),
]


def make(shape, dtype, contiguous=True, device="cpu"):
    if contiguous:
        return torch.randn(shape, dtype=dtype, device=device)
    # Same values laid out with the last two dims swapped in memory: a non-contiguous view.
    return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).transpose(
        -1, -2
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("mode,s_shape,t_shape", CASES)
def test_matches_reference(mode, s_shape, t_shape, dtype, contiguous):
    s = make(s_shape, dtype, contiguous).requires_grad_()
    t = make(t_shape, dtype, contiguous)
    s_ref = s.detach().clone().requires_grad_()
    out = gram_l2(s, t, mode)
    ref = ref_gram_l2(s_ref, t, mode)
    assert out.shape == () and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn((), dtype=dtype)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(s.grad, s_ref.grad, **TOL[dtype])


def test_teacher_gets_no_gradient():
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    gram_l2(s, t, "sample").backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("mode,s_shape,t_shape", [CASES[0], CASES[4]])
def test_opcheck(mode, s_shape, t_shape):
    s = torch.randn(s_shape, requires_grad=True)
    t = torch.randn(t_shape)
    torch.library.opcheck(torch.ops.autokd.gram_l2.default, (s, t, mode))
    _, gram_grad = torch.ops.autokd.gram_l2.default(s, t, mode)
    torch.library.opcheck(
        torch.ops.autokd.gram_l2_backward.default, (torch.tensor(0.7), gram_grad, s.detach())
    )


@pytest.mark.parametrize("mode,s_shape,t_shape", [CASES[0], CASES[2], CASES[4], CASES[6]])
def test_gradcheck(mode, s_shape, t_shape):
    s = torch.randn(s_shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(t_shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: gram_l2(a, t, mode), (s,))


def test_compile_fullgraph():
    s = torch.randn(6, 4, 10, requires_grad=True)
    t = torch.randn(6, 4, 7)

    @torch.compile(fullgraph=True)
    def loss(a, b):
        return gram_l2(a, b, "channel") * 2.0

    out = loss(s, t)
    out.backward()
    s_ref = s.detach().clone().requires_grad_()
    ref = ref_gram_l2(s_ref, t, "channel") * 2.0
    ref.backward()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(s.grad, s_ref.grad, **TOL[torch.float32])


shapes = st.tuples(st.integers(1, 9), st.integers(1, 7), st.integers(1, 7), st.integers(1, 7))


@settings(max_examples=25, deadline=None)
@given(shapes, st.sampled_from(["sample", "channel"]), st.floats(0.05, 20.0))
def test_properties(dims, mode, scale):
    n, c, ls, lt = dims
    s_shape, t_shape = ((n, c * ls), (n, c * lt)) if mode == "sample" else ((n, c, ls), (n, c, lt))
    s = torch.randn(s_shape, dtype=torch.float64)
    t = torch.randn(t_shape, dtype=torch.float64)
    # Zero for identical inputs, and for inputs equal up to a scale factor.
    assert gram_l2(s, s, mode).abs().item() < 1e-12
    assert gram_l2(s * scale, s, mode).abs().item() < 1e-12
    # Scale invariance in either argument; bounded by 4 (two unit-norm matrices).
    base = gram_l2(s, t, mode)
    torch.testing.assert_close(gram_l2(s * scale, t, mode), base, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gram_l2(s, t / scale, mode), base, rtol=1e-9, atol=1e-12)
    assert 0.0 <= base.item() <= 4.0 + 1e-12
    torch.testing.assert_close(base, ref_gram_l2(s, t, mode), rtol=1e-9, atol=1e-12)


def test_bad_inputs():
    f = torch.randn(4, 5)
    raises_value_error(
        gram_l2,
        r"autokd::gram_l2: expected mode one of 'sample', 'channel', got 'pixel'",
        f,
        f,
        "pixel",
    )
    raises_value_error(
        gram_l2,
        r"expected student of shape \[N, D\] \(mode 'sample'\), got \[4, 5, 1\]",
        f[..., None],
        f,
        "sample",
    )
    raises_value_error(
        gram_l2,
        r"expected teacher of shape \[N, C, L\] \(mode 'channel'\), got \[4, 5\]",
        f[..., None],
        f,
        "channel",
    )
    raises_value_error(
        gram_l2,
        r"expected teacher with the same N \(dim 0\) as student \(4\), got \[3, 5\]",
        f,
        f[:3],
        "sample",
    )
    raises_value_error(
        gram_l2,
        r"expected teacher with the same C \(dim 1\) as student \(5\), got \[4, 2, 3\]",
        f[..., None],
        torch.randn(4, 2, 3),
        "channel",
    )
    raises_value_error(
        gram_l2, r"expected student to be non-empty, got shape \[0, 5\]", f[:0], f[:0], "sample"
    )
    raises_value_error(
        gram_l2, r"expected teacher to be non-empty, got shape \[4, 0\]", f, f[:, :0], "sample"
    )
    raises_value_error(
        gram_l2,
        r"expected teacher of the same dtype as student \(Float\), got Double",
        f,
        f.double(),
        "sample",
    )
    raises_value_error(
        gram_l2,
        r"expected student to be a floating-point tensor .*, got Long",
        f.long(),
        f.long(),
        "sample",
    )
    raises_value_error(gram_l2, r"expected mode one of 'sample', 'channel', got 3", f, f, 3)


def test_cpu_half_computes_in_float32():
    s, t = torch.randn(6, 40), torch.randn(6, 30)
    for dtype in (torch.bfloat16, torch.float16):
        sh = s.to(dtype).requires_grad_()
        out = gram_l2(sh, t.to(dtype), "sample")
        out.backward()
        s32 = sh.detach().float().requires_grad_()
        ref = ref_gram_l2(s32, t.to(dtype).float(), "sample")
        ref.backward()
        assert out.dtype == dtype and sh.grad.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(sh.grad.float(), s32.grad, rtol=2e-2, atol=1e-3)


def test_backward_fills_no_zero_gram_grad():
    # gram_grad is a non-differentiable output: autograd must not build a zero gradient of its
    # size on every backward.
    s = torch.randn(16, 40, requires_grad=True)
    loss = gram_l2(s, torch.randn(16, 40), "sample")
    with torch.profiler.profile() as prof:
        loss.backward()
    assert not {e.name for e in prof.events()} & {"aten::zeros", "aten::zero_"}
    assert s.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("mode,s_shape,t_shape", CASES)
def test_cuda_matches_reference(mode, s_shape, t_shape, contiguous):
    for dtype in (torch.float32, torch.float64):
        s = make(s_shape, dtype, contiguous, "cuda").requires_grad_()
        t = make(t_shape, dtype, contiguous, "cuda")
        s_ref = s.detach().clone().requires_grad_()
        out, ref = gram_l2(s, t, mode), ref_gram_l2(s_ref, t, mode)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        out.backward()
        ref.backward()
        torch.testing.assert_close(s.grad, s_ref.grad, **TOL[dtype])


@pytest.mark.cuda
def test_cuda_opcheck():
    s = torch.randn(3, 8, 20, device="cuda", requires_grad=True)
    t = torch.randn(3, 8, 12, device="cuda")
    torch.library.opcheck(torch.ops.autokd.gram_l2.default, (s, t, "channel"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "mode,s_shape,t_shape",
    [("sample", (64, 4096), (64, 2048)), ("channel", (8, 64, 196), (8, 64, 49))],
)
def test_cuda_low_precision(mode, s_shape, t_shape, dtype):
    # Scaled so that the half-precision reference's squared Gram sums stay finite in float16.
    s32 = 0.05 * torch.randn(s_shape, device="cuda")
    t32 = 0.05 * torch.randn(t_shape, device="cuda")
    s_lo = s32.to(dtype).requires_grad_()
    t_lo = t32.to(dtype)
    s_rl = s_lo.detach().clone().requires_grad_()
    # The fp32 reference on the same (rounded) inputs is the truth.
    s_tr = s_lo.detach().float().requires_grad_()
    truth = ref_gram_l2(s_tr, t_lo.float(), mode)
    truth.backward()
    out = gram_l2(s_lo, t_lo, mode)
    out.backward()
    ref_lo = ref_gram_l2(s_rl, t_lo, mode)
    ref_lo.backward()
    assert out.dtype == dtype and s_lo.grad.dtype == dtype
    assert_low_precision_close(out, truth, ref_lo)
    assert_low_precision_close(s_lo.grad, s_tr.grad, s_rl.grad, reduce="norm")
