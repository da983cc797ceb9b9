"""Each classic distiller in configs/distillers/ against its published formula, written here
directly (no spec machinery): same loss value and same gradients."""

import pytest
import torch
import torch.nn.functional as F

from autokd.nn import DistillLoss
from autokd.space import list_distillers, load_distiller

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more


def feats(n=4, cs=6, ct=6, hs=4, ws=4, ht=None, wt=None):
    s = torch.randn(n, cs, hs, ws, dtype=DT, requires_grad=True)
    t = torch.randn(n, ct, ht or hs, wt or ws, dtype=DT)
    return s, t


def logits(n=5, k=7):
    return torch.randn(n, k, dtype=DT, requires_grad=True), torch.randn(n, k, dtype=DT) * 3


def check(loss_module, ours, theirs, inputs):
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9), (ours.item(), theirs.item())
    params = [p for p in loss_module.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(ours, inputs + params, allow_unused=True)
    g2 = torch.autograd.grad(theirs, inputs + params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (a - b).abs().max()


def conv_bn(x, adapter):
    """The student regressor written out: 1x1 conv, then batch norm with batch statistics."""
    y = torch.einsum("oc,nchw->nohw", adapter.conv.weight[:, :, 0, 0], x)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + adapter.bn.eps)
    return y * adapter.bn.weight[None, :, None, None] + adapter.bn.bias[None, :, None, None]


def test_every_shipped_distiller_is_tested_here():
    tested = {
        n[len("test_") :]
        for n in globals()
        if n.startswith("test_") and n != "test_every_shipped_distiller_is_tested_here"
    }
    assert set(list_distillers()) <= tested, set(list_distillers()) - tested


def test_kd():
    spec = load_distiller("kd")
    s, t = logits()
    m = DistillLoss(spec)
    ours = m(student_logits=s, teacher_logits=t).loss_kd
    T = 4.0
    theirs = (
        F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean")
        * T
        * T
    )
    check(m, ours, theirs, [s])


def test_fitnet():
    spec = load_distiller("fitnet")
    s, t = feats(cs=5, ct=7)
    m = DistillLoss(spec, (5, 7)).to(DT)
    ours = m(s, t).loss_kd
    theirs = 100 * ((conv_bn(s, m.pairs[0].adapter) - t) ** 2).mean()
    check(m, ours, theirs, [s])


def test_at():
    spec = load_distiller("at")
    s, t = feats(cs=5, ct=9)  # AT needs no adapter: channel counts may differ
    m = DistillLoss(spec, (5, 9)).to(DT)
    assert m.pairs[0].adapter is None

    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    ours = m(s, t).loss_kd
    theirs = 1000 * (at(s) - at(t)).pow(2).mean()
    check(m, ours, theirs, [s])


def test_sp():
    spec = load_distiller("sp")
    s, t = feats(n=6, cs=5, ct=8, hs=3, ws=3, ht=4, wt=2)  # SP: any feature shapes
    m = DistillLoss(spec, (5, 8)).to(DT)
    assert m.pairs[0].adapter is None
    b = s.shape[0]
    gs = F.normalize(s.view(b, -1) @ s.view(b, -1).t())
    gt = F.normalize(t.view(b, -1) @ t.view(b, -1).t())
    theirs = 3000 * ((gt - gs) ** 2).sum() / (b * b)
    ours = m(s, t).loss_kd
    check(m, ours, theirs, [s])


def test_cwd():
    spec = load_distiller("cwd")
    s, t = feats(cs=6, ct=6, hs=5, ws=3)
    m = DistillLoss(spec, (6, 6)).to(DT)
    tau = 4.0
    n, c, h, w = s.shape
    ps = F.log_softmax(s.reshape(-1, h * w) / tau, dim=1)
    pt = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    theirs = 3 * (pt * (torch.log(pt) - ps)).sum() * tau**2 / (n * c)
    ours = m(s, t).loss_kd
    check(m, ours, theirs, [s])


def test_ickd():
    spec = load_distiller("ickd")
    s, t = feats(cs=4, ct=6)
    m = DistillLoss(spec, (4, 6)).to(DT)
    e = conv_bn(s, m.pairs[0].adapter)
    b, c = t.shape[:2]
    fs, ft = e.view(b, c, -1), t.view(b, c, -1)
    gs = F.normalize(torch.bmm(fs, fs.permute(0, 2, 1)), dim=2)
    gt = F.normalize(torch.bmm(ft, ft.permute(0, 2, 1)), dim=2)
    theirs = 2.5 * ((gs - gt) ** 2).view(b, -1).sum() / (c * b)
    ours = m(s, t).loss_kd
    check(m, ours, theirs, [s])


def test_dist():
    spec = load_distiller("dist")
    s, t = logits(n=6, k=5)
    m = DistillLoss(spec)
    tau = 4.0

    def pearson_rows(a, b):
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    ys, yt = F.softmax(s / tau, dim=1), F.softmax(t / tau, dim=1)
    inter = tau**2 * (1 - pearson_rows(ys, yt)).mean()
    intra = tau**2 * (1 - pearson_rows(ys.t(), yt.t())).mean()
    theirs = 2 * inter + 2 * intra
    ours = m(student_logits=s, teacher_logits=t).loss_kd
    assert torch.allclose(ours, theirs, rtol=1e-5)
    check(m, ours, theirs, [s])


def test_mgd():
    spec = load_distiller("mgd")
    s, t = feats(n=3, cs=5, ct=5, hs=6, ws=6)
    m = DistillLoss(spec, (5, 5)).to(DT)
    gen = m.pairs[0].global_transform.generator
    torch.manual_seed(7)
    ours = m(s, t).loss_kd
    torch.manual_seed(7)
    n, c, h, w = s.shape
    mat = torch.rand((n, 1, h, w))
    mat = torch.where(mat > 1 - 0.5, 0, 1).to(DT)
    x = F.conv2d(s * mat, gen[0].weight, gen[0].bias, padding=1).relu()
    new = F.conv2d(x, gen[2].weight, gen[2].bias, padding=1)
    theirs = 0.00007 * F.mse_loss(new, t, reduction="sum") / n
    check(m, ours, theirs, [s])


def test_ls_kd():
    spec = load_distiller("ls_kd")
    s, t = logits()
    m = DistillLoss(spec)
    T = 2.0

    def z(x):
        return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))

    theirs = (
        9
        * F.kl_div(F.log_softmax(z(s) / T, 1), F.softmax(z(t) / T, 1), reduction="batchmean")
        * T
        * T
    )
    ours = m(student_logits=s, teacher_logits=t).loss_kd
    check(m, ours, theirs, [s])


def _dkd(s, t, y, tau, alpha, beta):
    """Decoupled KD written from the paper: binary KL on [p_y, 1 - p_y] plus KL among the other
    classes (softmax of the non-target logits), both times tau^2, batch mean."""
    n, k = s.shape
    keep = torch.ones(n, k, dtype=torch.bool)
    keep[torch.arange(n), y] = False
    ps, pt = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
    bs = torch.stack([ps[torch.arange(n), y], ps[keep].view(n, -1).sum(1)], 1)
    bt = torch.stack([pt[torch.arange(n), y], pt[keep].view(n, -1).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="batchmean")
    nckd = F.kl_div(
        F.log_softmax(s[keep].view(n, -1) / tau, 1),
        F.softmax(t[keep].view(n, -1) / tau, 1),
        reduction="batchmean",
    )
    return tau**2 * (alpha * tckd + beta * nckd)


def test_dkd():
    spec = load_distiller("dkd")
    s, t = logits()
    y = torch.tensor([0, 6, 3, 3, 1])
    m = DistillLoss(spec)
    m.set_progress(2.5 / 240)  # epoch 3 of the 20-epoch warm-up: weight 3/20
    ours = m(student_logits=s, teacher_logits=t, labels=y).loss_kd
    theirs = 3 / 20 * _dkd(s, t, y, 4.0, 1.0, 8.0)
    check(m, ours, theirs, [s])


def test_ls_dkd():
    spec = load_distiller("ls_dkd")
    s, t = logits()
    y = torch.tensor([2, 2, 5, 0, 4])
    m = DistillLoss(spec)
    m.set_progress(0.5)

    def z(x):
        return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))

    ours = m(student_logits=s, teacher_logits=t, labels=y).loss_kd
    theirs = _dkd(z(s), z(t), y, 4.0, 9.0, 81.0)  # alpha 1 * 9, beta 9 * 9 (the released run)
    check(m, ours, theirs, [s])


def test_pkd():
    spec = load_distiller("pkd")
    s, t = feats(cs=6, ct=6, hs=3, ws=5)
    m = DistillLoss(spec, (6, 6)).to(DT)
    ls = F.log_softmax(s, dim=1)  # softmax over channels at each position
    pt = F.softmax(t, dim=1)
    theirs = (pt * (pt.log() - ls)).sum(1).mean()
    ours = m(s, t).loss_kd
    check(m, ours, theirs, [s])


def test_none():
    spec = load_distiller("none")
    s, t = logits()
    out = DistillLoss(spec)(student_logits=s, teacher_logits=t)
    assert out.loss_kd.item() == 0.0 and not out.loss_kd.requires_grad
