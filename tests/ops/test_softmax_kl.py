"""autokd::softmax_kl against its eager reference: values, gradients, views, errors."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import autokd
from autokd.reference import softmax_kl as reference
from helpers import assert_low_precision_close, torch_threads

op = autokd.ops.softmax_kl


def _feature(n, c, h, w, dtype, device="cpu"):
    return (torch.randn(n, c, h, w, dtype=dtype, device=device) * 2).requires_grad_()


# Each case: (leaf student, teacher source) -> (student view, teacher view). Gradients are
# compared on the leaf, so views that copy would show up as wrong strides, not as wrong values.
VIEWS = {
    "logits": lambda f, g: (f, g),
    "transposed": lambda f, g: (f.t(), g.t()),
    "sliced": lambda f, g: (f[:, ::2], g[:, ::2]),
}
FEATURE_VIEWS = {
    "channelwise": lambda f, g: (
        f.reshape(-1, f.shape[2] * f.shape[3]),
        g.reshape(-1, g.shape[2] * g.shape[3]),
    ),
    "samplewise": lambda f, g: (f.reshape(f.shape[0], -1), g.reshape(g.shape[0], -1)),
    "channel_view": lambda f, g: (
        f.view(f.shape[0], f.shape[1], -1).transpose(0, 1),
        g.view(g.shape[0], g.shape[1], -1).transpose(0, 1),
    ),
    "rank3": lambda f, g: (f.view(f.shape[0], f.shape[1], -1), g.view(g.shape[0], g.shape[1], -1)),
    # student a view, teacher contiguous: the two inputs walk different strides
    "mixed_strides": lambda f, g: (
        f.view(f.shape[0], f.shape[1], -1).transpose(0, 1),
        g.view(g.shape[0], g.shape[1], -1).transpose(0, 1).contiguous(),
    ),
}
LOGIT_SHAPES = [(7, 13), (1, 1), (1, 9), (9, 1), (128, 100), (3, 1500)]
FEATURE_SHAPES = [(4, 3, 5, 6), (1, 1, 1, 1), (2, 5, 1, 7), (3, 2, 23, 29)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def _check(f, g, view, tau, dtype):
    s, t = view(f, g)
    got = op(s, t, tau)
    assert got.dtype == dtype and got.shape == ()
    (grad,) = torch.autograd.grad(got, f)
    f64 = f.detach().double().requires_grad_()
    s64, t64 = view(f64, g.double())
    want = reference(s64, t64, tau)
    (want_grad,) = torch.autograd.grad(want, f64)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    scale = want_grad.abs().max().item() + 1e-30
    torch.testing.assert_close(grad.double() / scale, want_grad / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("view", VIEWS, ids=list(VIEWS))
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
def test_logits_match_reference(shape, view, dtype):
    f = (torch.randn(shape, dtype=dtype) * 3).requires_grad_()
    g = torch.randn(shape, dtype=dtype) * 3
    _check(f, g, VIEWS[view], 2.0, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("view", FEATURE_VIEWS, ids=list(FEATURE_VIEWS))
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=str)
def test_feature_views_match_reference(shape, view, dtype):
    f = _feature(*shape, dtype)
    g = torch.randn(shape, dtype=dtype) * 2
    _check(f, g, FEATURE_VIEWS[view], 4.0, dtype)


def test_channel_view_is_not_copied_and_grad_keeps_strides():
    f = _feature(2, 3, 4, 5, torch.float32)
    s = f.view(2, 3, 20).transpose(0, 1)
    out = op(s, s.detach() + 1, 1.0)
    _, grad = torch.ops.autokd.softmax_kl(s.detach(), s.detach(), 1.0, True)
    assert grad.stride() == s.stride()
    out.backward()
    assert f.grad.shape == f.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("view", ["logits", "transposed", "channel_view", "long_channel_view"])
def test_gradient_output_of_the_op(view, dtype):
    # The op's second result is d loss / d student for a unit upstream gradient, written in the
    # same sweep as the loss; without with_grad it is empty and the loss is unchanged.
    if view == "long_channel_view":  # rows of 2 * 70000 elements: longer than one scratch row
        f, g = torch.randn(2, 3, 70000) * 3, torch.randn(2, 3, 70000) * 3
    else:
        f, g = torch.randn(6, 4, 33) * 3, torch.randn(6, 4, 33) * 3
    if view == "logits":
        f, g = f.reshape(24, 33), g.reshape(24, 33)
    elif view == "transposed":
        f, g = f.reshape(24, 33).t(), g.reshape(24, 33).t()
    else:
        f, g = f.transpose(0, 1), g.transpose(0, 1)
    s, t = f.to(dtype), g.to(dtype)
    loss, grad = torch.ops.autokd.softmax_kl(s, t, 2.0, True)
    loss_only, empty = torch.ops.autokd.softmax_kl(s, t, 2.0, False)
    assert empty.shape == (0,) and grad.shape == s.shape and grad.stride() == s.stride()
    assert loss.item() == loss_only.item()
    s64 = s.double().requires_grad_()
    (want,) = torch.autograd.grad(reference(s64, t.double(), 2.0), s64)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-6)
    if dtype == torch.bfloat16:
        tol = dict(rtol=0, atol=want.abs().max().item() * 2**-7)
    torch.testing.assert_close(grad.double(), want, **tol)


def test_backward_without_saved_gradient_and_retain_graph():
    # Calling the op without with_grad still differentiates (the backward recomputes the
    # gradient), and a retained graph gives the same gradient twice.
    s = torch.randn(5, 3, 7, dtype=torch.float64).transpose(0, 1).requires_grad_()
    t = torch.randn(3, 5, 7, dtype=torch.float64)
    want = torch.autograd.grad(reference(s, t, 1.5), s)[0]
    loss, empty = torch.ops.autokd.softmax_kl(s, t, 1.5, False)
    assert empty.numel() == 0
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], want)
    loss = op(s, t, 1.5)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(loss * 3, s)[0]
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, 3 * want)


def test_no_gradient_work_without_autograd():
    s = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9)
    with torch.no_grad():
        out = op(s, t, 2.0)
    assert not out.requires_grad
    assert not op(s.detach(), t, 2.0).requires_grad


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("length", [15, 16, 17, 31, 32, 33, 100, 2047, 2048, 2049, 4111])
def test_float_rows_of_every_tail_length(length, layout):
    # float32 rows run on 16-float vectors; the last, partial vector of a row is done first
    # and masked. Lengths around multiples of 16 and of the 2048-element chunk, rows read in
    # place (contiguous) or gathered into scratch (transposed), with and without gradient.
    rows = 3
    f = torch.randn(rows, length, dtype=torch.float64) * 3
    g = torch.randn(rows, length, dtype=torch.float64) * 3
    if layout == "transposed":
        s, t = f.t().contiguous().t(), g.t().contiguous().t()
    else:
        s, t = f, g
    s64 = s.clone().requires_grad_()
    want = reference(s64, t, 2.0)
    (want_grad,) = torch.autograd.grad(want, s64)
    s32 = s.float()
    if layout == "transposed":
        s32 = s.t().float().contiguous().t()
    t32 = t.float()
    loss, grad = torch.ops.autokd.softmax_kl(s32, t32, 2.0, True)
    loss_only, _ = torch.ops.autokd.softmax_kl(s32, t32, 2.0, False)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(loss_only, loss, rtol=1e-6, atol=1e-7)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(grad.double() / scale, want_grad / scale, rtol=2e-5, atol=1e-6)


def test_long_rows_and_large_logits():
    # Rows longer than one chunk, with maxima in later chunks (the running max must rescale).
    s = torch.linspace(-50, 50, 5000, dtype=torch.float64).repeat(3, 1)
    t = torch.linspace(60, -40, 5000, dtype=torch.float64).repeat(3, 1)
    torch.testing.assert_close(
        op(s.float(), t.float(), 1.0).double(), reference(s, t, 1.0), rtol=1e-4, atol=1e-4
    )


def test_identical_inputs_give_zero():
    x = torch.randn(16, 40)
    assert abs(op(x, x, 3.0).item()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    s32 = torch.randn(64, 300) * 3
    t32 = torch.randn(64, 300) * 3
    want = reference(s32.double(), t32.double(), 2.0)
    got = op(s32.to(dtype), t32.to(dtype), 2.0)
    ref_low = reference(s32.to(dtype), t32.to(dtype), 2.0)
    assert got.dtype == dtype
    assert_low_precision_close(got, want, ref_low, reduce="elementwise")


def test_teacher_gets_no_gradient():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    op(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: (
            torch.randn(6, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(6, 5, dtype=torch.float64),
        ),
        lambda: (torch.randn(4, 6, 5).transpose(0, 1).requires_grad_(), torch.randn(6, 4, 5)),
    ],
    ids=["logits", "channel_view"],
)
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck(make, with_grad):
    s, t = make()
    torch.library.opcheck(torch.ops.autokd.softmax_kl.default, (s, t, 2.0, with_grad))


def test_gradcheck():
    s = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: op(x, t, 2.0), (s,))
    view = torch.randn(3, 4, 6, dtype=torch.float64).transpose(0, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: op(x, t, 1.5), (view[:, :, :5],))


def test_torch_compile_fullgraph():
    f = _feature(4, 3, 5, 6, torch.float32)
    g = torch.randn(4, 3, 5, 6)

    @torch.compile(fullgraph=True)
    def loss(f, g):
        return op(f.view(4, 3, 30).transpose(0, 1), g.view(4, 3, 30).transpose(0, 1), 2.0)

    out = loss(f, g)
    out.backward()
    f2 = f.detach().clone().requires_grad_()
    want = reference(f2.view(4, 3, 30).transpose(0, 1), g.view(4, 3, 30).transpose(0, 1), 2.0)
    want.backward()
    torch.testing.assert_close(out, want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(f.grad, f2.grad, rtol=2e-5, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    a=st.integers(1, 7),
    b=st.integers(1, 700),
    rank3=st.booleans(),
    transpose=st.booleans(),
    tau=st.floats(0.25, 8.0),
)
def test_property_random_shapes(rows, a, b, rank3, transpose, tau):
    shape = (a, rows, b) if transpose else (rows, a, b)
    f = (torch.randn(shape, dtype=torch.float64) * 4).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64) * 4

    def view(x, y):
        if transpose:
            x, y = x.transpose(0, 1), y.transpose(0, 1)
        if not rank3:
            x, y = x.reshape(rows, -1), y.reshape(rows, -1)
        return x, y

    _check(f, g, view, tau, torch.float64)
    s, t = view(f.detach(), g)
    assert op(s, t, tau).item() >= -1e-12  # KL is non-negative


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    c=st.integers(1, 5),
    hw=st.integers(1, 300),
    teacher_contiguous=st.booleans(),
    tau=st.floats(0.25, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=9, c=1, hw=228, teacher_contiguous=False, tau=1.0, seed=0)  # one merged run of 2052
def test_property_float32_channel_views(n, c, hw, teacher_contiguous, tau, seed):
    # float32 channel views ([C, N, H*W] through a transpose) take the kernel that reads each
    # sample's plane in place (planes of 16+ elements) or the gathering one: both must match
    # the reference, with and without the gradient. (Rows that merge into one contiguous run
    # longer than 2048, e.g. C = 1, stream without the gradient and are buffered with it: the
    # two losses then differ in the last bits.)
    gen = torch.Generator().manual_seed(seed)  # the same data when hypothesis replays a case
    f = (torch.randn(n, c, hw, generator=gen) * 4).requires_grad_()
    g = torch.randn(n, c, hw, generator=gen) * 4

    def view(x, y):
        x, y = x.transpose(0, 1), y.transpose(0, 1)
        return x, (y.contiguous() if teacher_contiguous else y)

    s, t = view(f.detach(), g)
    loss, grad = torch.ops.autokd.softmax_kl(s, t, tau, True)
    s64 = s.double().requires_grad_()
    want = reference(s64, t.double(), tau)
    (want_grad,) = torch.autograd.grad(want, s64)
    # The loss is tau^2 * KL: compared in units of tau^2 (float32 rounding of s / tau grows
    # with tau, e.g. on one-element rows whose KL is exactly 0). The gradient is
    # tau / C * (softmax(s) - softmax(t)): compared in units of tau / C.
    torch.testing.assert_close(loss.double() / tau**2, want / tau**2, **TOL[torch.float32])
    unit = tau / c
    torch.testing.assert_close(grad.double() / unit, want_grad / unit, **TOL[torch.float32])
    torch.testing.assert_close(
        torch.ops.autokd.softmax_kl(s, t, tau, False)[0], loss, rtol=1e-6, atol=0
    )
    assert grad.stride() == s.stride()


BAD = [
    (
        "rank 1",
        lambda: (torch.randn(5), torch.randn(5), 1.0),
        r"autokd::softmax_kl: expected student of shape \[R, L\] or \[R, A, B\], got \[5\]",
    ),
    (
        "rank 4",
        lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), 1.0),
        r"expected student of shape \[R, L\] or \[R, A, B\], got \[2, 3, 4, 5\]",
    ),
    (
        "shapes",
        lambda: (torch.randn(4, 5), torch.randn(4, 6), 1.0),
        r"autokd::softmax_kl: expected teacher of the same shape as student \[4, 5\], got \[4, 6\]",
    ),
    (
        "tau 0",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), 0.0),
        r"autokd::softmax_kl: expected tau > 0 and finite, got 0",
    ),
    (
        "tau < 0",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), -2.0),
        r"expected tau > 0 and finite, got -2",
    ),
    (
        "tau inf",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), math.inf),
        r"expected tau > 0 and finite, got inf",
    ),
    (
        "tau nan",
        lambda: (torch.randn(4, 5), torch.randn(4, 5), math.nan),
        r"expected tau > 0 and finite, got nan",
    ),
    (
        "empty",
        lambda: (torch.randn(0, 5), torch.randn(0, 5), 1.0),
        r"autokd::softmax_kl: expected student to be non-empty, got shape \[0, 5\]",
    ),
    (
        "dtypes",
        lambda: (torch.randn(4, 5), torch.randn(4, 5, dtype=torch.float64), 1.0),
        r"autokd::softmax_kl: expected teacher of the same dtype as student \(Float\), got Double",
    ),
    (
        "integer",
        lambda: (torch.ones(4, 5, dtype=torch.int64), torch.ones(4, 5, dtype=torch.int64), 1.0),
        r"autokd::softmax_kl: expected student to be a floating-point tensor .*, got Long",
    ),
]


@pytest.mark.parametrize("args, message", [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        op(*args())


def test_backward_only_scales_the_saved_gradient():
    # The kernel wrote the gradient in the forward: the backward neither recomputes it nor
    # fills a zero gradient for the op's second (non-differentiable) output.
    s = torch.randn(64, 300, requires_grad=True)
    loss = op(s, torch.randn(64, 300), 2.0)
    with torch.profiler.profile() as prof:
        loss.backward()
    names = {e.name for e in prof.events()}
    assert "aten::mul" in names
    assert not names & {"autokd::softmax_kl", "aten::zeros", "aten::zero_"}


def test_result_does_not_depend_on_thread_count():
    # Rows are split across threads (each with its own scratch); loss and gradient must be
    # bit-identical with one thread and with two.
    f = torch.randn(64, 96, 48)
    cases = [
        (torch.randn(256, 1000), torch.randn(256, 1000)),
        (f.transpose(0, 1), f.flip(-1).transpose(0, 1)),
    ]
    out = {}
    for threads in (1, 2):
        with torch_threads(threads):
            out[threads] = [torch.ops.autokd.softmax_kl(s, t, 2.0, True) for s, t in cases]
    for (l1, g1), (l2, g2) in zip(out[1], out[2]):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("view", ["logits", "channelwise", "samplewise", "channel_view"])
def test_cuda_matches_reference(view, dtype):
    if view == "logits":
        f = torch.randn(256, 1000, device="cuda") * 3
        g = torch.randn(256, 1000, device="cuda") * 3
        make = VIEWS["logits"]
    else:
        f = torch.randn(8, 16, 12, 12, device="cuda") * 2
        g = torch.randn(8, 16, 12, 12, device="cuda") * 2
        make = FEATURE_VIEWS[view]
    f64 = f.double().requires_grad_()
    want = reference(*make(f64, g.double()), 2.0)
    (want_grad,) = torch.autograd.grad(want, f64)
    fl = f.to(dtype).requires_grad_()
    got = op(*make(fl, g.to(dtype)), 2.0)
    (grad,) = torch.autograd.grad(got, fl)
    fr = f.to(dtype).requires_grad_()
    ref_low = reference(*make(fr, g.to(dtype)), 2.0)
    (ref_grad,) = torch.autograd.grad(ref_low, fr)
    assert got.dtype == dtype and grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    else:
        assert_low_precision_close(got, want, ref_low)
        assert_low_precision_close(grad, want_grad, ref_grad)


@pytest.mark.cuda
def test_cuda_float64_and_opcheck():
    s = torch.randn(5, 4, 7, device="cuda", dtype=torch.float64).transpose(0, 1)
    t = torch.randn(4, 5, 7, device="cuda", dtype=torch.float64)
    s.requires_grad_()
    torch.testing.assert_close(op(s, t, 2.0), reference(s, t, 2.0))
    torch.library.opcheck(torch.ops.autokd.softmax_kl.default, (s, t, 2.0, True))
    torch.library.opcheck(torch.ops.autokd.softmax_kl.default, (s, t, 2.0, False))


@pytest.mark.cuda
def test_cuda_mixed_devices():
    with pytest.raises(
        ValueError,
        match=r"autokd::softmax_kl: expected teacher on the same "
        r"device as student \(cuda:0\), got cpu",
    ):
        op(torch.randn(4, 5, device="cuda"), torch.randn(4, 5), 1.0)
