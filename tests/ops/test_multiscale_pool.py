"""autokd::multiscale_pool against its eager reference (autokd.reference.multiscale_pool)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autokd.ops import multiscale_pool
from autokd.reference import multiscale_pool as reference
from helpers import assert_low_precision_close, escape

# (shape, grids): odd sizes whose bins overlap and do not nest, size-1 dims, a nesting case.
CASES = [
    ((2, 3, 7, 5), [1, 2, 3, 4]),
    ((1, 1, 1, 1), [1]),
    ((3, 1, 8, 8), [1, 2, 4]),
    ((2, 4, 9, 13), [3, 2, 5, 1, 4]),
    ((1, 2, 5, 1), [1]),
    ((2, 3, 6, 11), [2, 2, 6]),
    ((1, 5, 32, 32), [1, 2, 4]),
]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def make_input(shape, dtype, layout, device="cpu", requires_grad=False):
    """A [N, C, H, W] tensor of `shape` with the memory layout named by `layout`."""
    N, C, H, W = shape
    if layout == "contiguous":
        x = torch.randn(shape, dtype=dtype, device=device)
    elif layout == "channels_last":
        x = torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    elif layout == "transposed":  # W has the largest stride
        x = torch.randn(N, C, W, H, dtype=dtype, device=device).transpose(2, 3)
    elif layout == "sliced":  # gaps between channels and between rows
        x = torch.randn(N, 2 * C, H, W + 3, dtype=dtype, device=device)[:, ::2, :, 1 : W + 1]
    else:
        raise KeyError(layout)
    assert x.shape == shape
    return x.requires_grad_(requires_grad)


def tol(dtype):
    if dtype == torch.float64:
        return {"atol": 1e-12, "rtol": 1e-10}
    return {"atol": 1e-5, "rtol": 1e-5}


def check_parity(x, grids):
    """Forward and gradient of autokd vs the reference on the same input."""
    out = multiscale_pool(x, grids)
    want = reference(x, grids)
    assert out.shape == want.shape and out.dtype == x.dtype and out.is_contiguous()
    torch.testing.assert_close(out, want, **tol(x.dtype))
    grad = torch.randn_like(want)
    (got_gi,) = torch.autograd.grad(out, x, grad)
    (want_gi,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_gi, want_gi, **tol(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,grids", CASES)
def test_parity(shape, grids, layout, dtype):
    check_parity(make_input(shape, dtype, layout, requires_grad=True), grids)


# float32: the blocked kernel (16 planes per block, partial last block) serves every geometry
# but one: 4 x 4 planes with grids from {1, 2, 4} (the digits pair's features) have a kernel of
# their own, forward and backward (any grid order, repeats). Geometries that once had kernels
# of their own (8 x 8 and 32 x 32 with grids 1, 2, 4; nested grids in cells 1-16 pixels wide)
# stay in this list, so the blocked kernel is tested on them: widths with every tail of its
# row pass, grids that do not nest, many small planes, and each layout.
F32_CASES = [
    ((2, 3, 16, 16), [1, 2, 4]),
    ((1, 4, 17, 29), [1, 2, 3, 5, 7]),  # W = 16 + 8 + 4 + 1; bins overlap, nothing nests
    ((3, 2, 28, 28), [1, 2, 4]),  # 7-wide cells
    ((1, 3, 20, 28), [2, 1, 2]),  # F = 2, 14-wide cells, a repeated grid
    ((2, 2, 16, 64), [4, 1]),  # 16-wide cells, no grid 2
    ((1, 3, 40, 21), [2, 3, 6]),  # W = 16 + 4 + 1, no grid 1
    ((2, 2, 64, 9), [9, 1]),  # one column per cell of the finest grid
    ((2, 3, 24, 36), [2, 6, 3, 1, 6, 2]),  # nested, repeats; 2 from 6 (3 x 3 blocks)
    ((1, 2, 32, 16), [8, 4, 1]),  # nested: 4 from 8 (2 x 2), 1 from 4 (4 x 4 blocks)
    ((5, 51, 8, 8), [1, 2, 4]),  # 255 small planes, grids in order
    ((3, 350, 8, 8), [1, 2, 4]),  # 1050 planes: two threads split mid-image
    ((2, 5, 8, 8), [4, 2, 4, 1]),  # out of order with a repeat
    ((1, 3, 8, 8), [2, 4]),  # no grid 1
    ((3, 2, 8, 8), [4]),  # grid 4 alone
    ((3, 27, 32, 32), [1, 2, 4]),  # 81 planes
    ((2, 5, 32, 32), [4, 2, 4, 1]),  # out of order with a repeat
    ((1, 3, 32, 32), [2, 4]),  # no grid 1
    ((2, 2, 32, 32), [4, 1]),  # no grid 2
    ((1, 2, 64, 32), [1, 2, 4]),  # 8-wide cells, 16 rows
    ((1, 2, 16, 8), [4, 1, 2, 4]),  # 4 x 2 cells, out of order with a repeat
    ((1, 2, 8, 4), [2, 4]),  # 2 x 1 cells, no grid 1
    ((2, 2, 4, 8), [2, 1]),  # nested, 2 x 4 cells
    ((5, 51, 7, 7), [1, 2, 4]),  # 255 small planes: 15 full blocks of 16, one of 15
    ((3, 7, 5, 7), [1, 2, 3, 5]),  # small planes, overlapping bins
    ((2, 3, 4, 4), [1, 2, 4]),  # 4 x 4 kernel, grids in order (identity map)
    ((2, 5, 4, 4), [4, 2, 4, 1]),  # 4 x 4 kernel, out of order with a repeat
    ((3, 2, 4, 4), [2, 1]),  # 4 x 4 kernel, no grid 4
    ((1, 3, 4, 4), [4]),  # 4 x 4 kernel, grid 4 alone
    ((2, 2, 4, 4), [3, 1]),  # 4 x 4 but grid 3: the blocked kernel
    ((3, 1500, 4, 4), [1, 2, 4]),  # 4 x 4 kernel, 4500 planes: split across threads
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,grids", F32_CASES)
def test_parity_float32_paths(shape, grids, layout):
    check_parity(make_input(shape, torch.float32, layout, requires_grad=True), grids)


@pytest.mark.parametrize("side", [4, 8, 32])
@pytest.mark.parametrize("grids", [[1, 2, 4], [2, 4, 1]])
def test_planes_channel_slice(side, grids):
    # Contiguous rows and planes (row stride W, plane stride H * W) but a gap between images:
    # the kernels must walk (n, c) rather than take the planes as one contiguous run.
    x = torch.randn(3, 9, side, side)[:, 2:7]
    assert x.stride()[1:] == (side * side, side, 1) and x.stride(0) != 5 * side * side
    torch.testing.assert_close(multiscale_pool(x, grids), reference(x, grids), **tol(x.dtype))


def test_float32_planes_match_float64():
    # The float32 kernels against exact float64 sums of the same values, not only against the
    # float32 reference (which could share an accumulation error).
    x = torch.randn(3, 5, 23, 37)
    grids = [1, 2, 3, 4, 6]
    want = reference(x.double(), grids)
    torch.testing.assert_close(multiscale_pool(x, grids).double(), want, atol=2e-6, rtol=1e-5)


def test_default_grids():
    x = torch.randn(2, 3, 8, 8)
    out = multiscale_pool(x)
    assert out.shape == (2, 3, 21)
    torch.testing.assert_close(out, reference(x, (1, 2, 4)))
    # The 1x1 cell is the plane mean; the 2x2 cells are quadrant means.
    torch.testing.assert_close(out[..., 0], x.mean(dim=(2, 3)))
    torch.testing.assert_close(out[..., 1], x[:, :, :4, :4].mean(dim=(2, 3)))


def test_backward_op_noncontiguous_grad():
    # grad from sum() reaches the op as an expanded (stride-0) tensor.
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    grids = [1, 3, 2]
    multiscale_pool(x, grids).sum().backward()
    want = torch.autograd.grad(reference(x, grids).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    g = torch.randn(2, 3, 2 * 14, dtype=torch.float64)[:, :, ::2]
    got = torch.ops.autokd.multiscale_pool_backward(g, [2, 3, 7, 5], grids)
    want = torch.autograd.grad(reference(x, grids), x, g)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu(dtype):
    check_low_precision("cpu", dtype)


def check_low_precision(device, dtype):
    """Error vs the fp32 reference at most 2x that of the reference run in `dtype`."""
    grids = [1, 2, 3, 4]
    x = torch.randn(4, 8, 13, 11, device=device).to(dtype)
    x32 = x.float().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    exact = reference(x32, grids)
    got, ref = multiscale_pool(xl, grids), reference(xr, grids)
    grad = torch.randn_like(exact)
    (g_exact,) = torch.autograd.grad(exact, x32, grad)
    (g_got,) = torch.autograd.grad(got, xl, grad.to(dtype))
    (g_ref,) = torch.autograd.grad(ref, xr, grad.to(dtype))
    for a, r, e in ((got, ref, exact), (g_got, g_ref, g_exact)):
        assert a.dtype == dtype
        assert_low_precision_close(a, e, r, floor=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 3, 7, 5), torch.float64, layout, requires_grad=True)
    torch.library.opcheck(torch.ops.autokd.multiscale_pool.default, (x, [1, 2, 3]))
    g = torch.randn(2, 3, 14, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.autokd.multiscale_pool_backward.default, (g, [2, 3, 7, 5], [1, 2, 3])
    )


def test_gradcheck():
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: multiscale_pool(t, [1, 2, 3, 4]), (x,))
    assert torch.autograd.gradgradcheck(lambda t: multiscale_pool(t, [3, 2]), (x,))


def test_torch_compile_fullgraph():
    grids = [1, 2, 3]

    def loss(a, b):
        return (multiscale_pool(a, grids) - multiscale_pool(b, grids)).pow(2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    a = torch.randn(2, 4, 7, 9, requires_grad=True)
    b = torch.randn(2, 4, 7, 9)
    got = compiled(a, b)
    got.backward()
    a2 = a.detach().clone().requires_grad_(True)
    want = (reference(a2, grids) - reference(b, grids)).pow(2).sum()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, a2.grad)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 3),
    C=st.integers(1, 4),
    H=st.integers(1, 17),
    W=st.integers(1, 17),
    layout=st.sampled_from(LAYOUTS),
    data=st.data(),
)
def test_property_random_shapes(N, C, H, W, layout, data):
    grids = data.draw(st.lists(st.integers(1, min(H, W)), min_size=1, max_size=5))
    x = make_input((N, C, H, W), torch.float64, layout, requires_grad=True)
    check_parity(x, grids)
    # Every grid's cells average to the plane mean only when bins tile the plane exactly; the
    # 1x1 grid is always the mean.
    out = multiscale_pool(x, [1] + grids)
    torch.testing.assert_close(out[..., 0], x.mean(dim=(2, 3)))


RANGE = "expected grids entries in [1, min(H, W)]"
BAD = [
    (lambda: torch.randn(3, 4, 5), [1], "expected input of shape [N, C, H, W], got [3, 4, 5]"),
    (lambda: torch.randn(0, 4, 5, 5), [1], "expected input to be non-empty, got shape [0, 4, 5"),
    (lambda: torch.randn(2, 4, 5, 5), [], "expected grids to be a non-empty list"),
    (lambda: torch.randn(2, 4, 5, 5), [1, 0], RANGE + " = [1, 5], got 0"),
    (lambda: torch.randn(2, 4, 6, 5), [6], RANGE + " = [1, 5], got 6"),
    (lambda: torch.randn(2, 4, 3, 9), [4], RANGE + " = [1, 3], got 4"),
    (lambda: torch.randn(2, 4, 5, 5), [1] * 17, "expected grids to have at most 16 entries, got"),
    (
        lambda: torch.ones(2, 4, 5, 5, dtype=torch.int64),
        [1],
        "expected input to be a floating-point tensor (float64, float32, float16 or bfloat16), "
        "got Long",
    ),
]


@pytest.mark.parametrize("make,grids,message", BAD)
def test_bad_input(make, grids, message):
    with pytest.raises(ValueError, match="autokd::multiscale_pool: " + escape(message)):
        multiscale_pool(make(), grids)


def test_bad_input_backward():
    with pytest.raises(
        ValueError,
        match=escape(
            "autokd::multiscale_pool_backward: expected grad of shape [2, 3, 5], got [2, 3, 4]"
        ),
    ):
        torch.ops.autokd.multiscale_pool_backward(torch.randn(2, 3, 4), [2, 3, 5, 5], [1, 2])
    with pytest.raises(ValueError, match="expected input_size of length 4"):
        torch.ops.autokd.multiscale_pool_backward(torch.randn(2, 3, 5), [2, 3, 5], [1, 2])


def test_bad_grid_types():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError, match="expected grids to be a list of ints, got int"):
        multiscale_pool(x, 2)
    with pytest.raises(TypeError, match="expected grids entries to be ints, got True"):
        multiscale_pool(x, [True])


def test_fake_kernel_errors_and_symbolic_shape():
    from torch.fx.experimental.proxy_tensor import make_fx

    def trace(grids, x):
        return make_fx(lambda t: multiscale_pool(t, grids), tracing_mode="symbolic")(x)

    gm = trace([1, 2, 3], torch.randn(3, 4, 7, 5))
    (out,) = [n for n in gm.graph.nodes if n.op == "output"][0].args[0:1]
    N, C, S = out.meta["val"].shape
    assert isinstance(N, torch.SymInt) and isinstance(C, torch.SymInt) and S == 14
    with pytest.raises(ValueError, match=escape("autokd::multiscale_pool: expected input of")):
        trace([1], torch.randn(4, 7, 5))
    with pytest.raises(ValueError, match="expected grids to be a non-empty list"):
        trace([], torch.randn(3, 4, 7, 5))
    with pytest.raises(ValueError, match=escape("expected grids entries in [1, min(H, W)]")):
        trace([6], torch.randn(3, 4, 7, 5))
    with pytest.raises(ValueError, match="expected input to be a floating-point tensor"):
        trace([1], torch.ones(3, 4, 7, 5, dtype=torch.int32))


# ---- CUDA (skipped without a GPU; see tests/conftest.py) ----------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,grids", CASES + [((2, 3, 120, 130), [1, 2, 4, 7])])
def test_cuda_parity(shape, grids, layout, dtype):
    x = make_input(shape, dtype, layout, device="cuda", requires_grad=True)
    check_parity(x, grids)
    # Same numbers as the CPU kernel.
    torch.testing.assert_close(
        multiscale_pool(x, grids).cpu(), multiscale_pool(x.detach().cpu(), grids), **tol(dtype)
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    check_low_precision("cuda", dtype)


@pytest.mark.cuda
def test_cuda_opcheck_and_gradcheck():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.autokd.multiscale_pool.default, (x, [1, 2, 3]))
    assert torch.autograd.gradcheck(lambda t: multiscale_pool(t, [1, 2, 3, 4]), (x,))


@pytest.mark.cuda
def test_cuda_compile_and_errors():
    f = torch.compile(lambda t: multiscale_pool(t, [1, 2, 4]).square().sum(), fullgraph=True)
    x = torch.randn(4, 8, 16, 16, device="cuda", requires_grad=True)
    f(x).backward()
    want = torch.autograd.grad(reference(x, [1, 2, 4]).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    with pytest.raises(ValueError, match=escape(RANGE + " = [1, 16], got 17")):
        multiscale_pool(x, [17])


@pytest.mark.parametrize("side", [4, 8])
@pytest.mark.parametrize("grids", [[1, 2, 4], [4, 2, 4, 1]])
def test_backward_float32_strided_grad(side, grids):
    # The backward reads grad through its strides (4 x 4: the kernel of its own, 8 x 8: the
    # blocked one): an expanded (stride-0) gradient from sum() and a sliced one, in and out of
    # the 1, 2, 4 order.
    x = torch.randn(3, 5, side, side, requires_grad=True)
    multiscale_pool(x, grids).sum().backward()
    want = torch.autograd.grad(reference(x, grids).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    S = sum(s * s for s in grids)
    g = torch.randn(3, 5, 2 * S)[:, :, ::2]
    got = torch.ops.autokd.multiscale_pool_backward(g, [3, 5, side, side], grids)
    want = torch.autograd.grad(reference(x, grids), x, g)[0]
    torch.testing.assert_close(got, want)
