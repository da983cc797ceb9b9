"""autokd.nn's kernel modules agree with the eager references and reject bad settings; the
whole-design loss takes a spec."""

import pytest
import torch

import autokd
from autokd.nn import DistillLoss
from autokd.nn.losses import DIST, CKALoss, GramL2, MultiScalePool, SoftmaxKL
from autokd.space import DistillerSpec

ref = autokd.reference


def test_softmax_kl_module():
    s, t = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    out = SoftmaxKL(tau=4.0)(s, t)
    torch.testing.assert_close(out, ref.softmax_kl(s, t, 4.0))
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_dist_module():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    inter, intra = ref.pearson(s, t, 2.0)
    torch.testing.assert_close(DIST(tau=2.0, beta=1.0, gamma=2.0)(s, t), inter + 2.0 * intra)


def test_gram_and_cka_modules():
    a, b = torch.randn(7, 12), torch.randn(7, 5)
    torch.testing.assert_close(GramL2("sample")(a, b), ref.gram_l2(a, b, "sample"))
    torch.testing.assert_close(CKALoss()(a, b), 1 - ref.cka(a, b, False))
    c, d = torch.randn(3, 4, 9), torch.randn(3, 4, 6)
    torch.testing.assert_close(GramL2("channel")(c, d), ref.gram_l2(c, d, "channel"))


def test_multiscale_pool_module():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(MultiScalePool((1, 2))(x), ref.multiscale_pool(x, [1, 2]))


def test_bad_settings():
    with pytest.raises(ValueError, match="tau > 0"):
        SoftmaxKL(tau=0)
    with pytest.raises(ValueError, match="mode one of sample, channel"):
        GramL2("pixel")


def test_distill_loss_takes_a_spec_and_refuses_what_only_space_can_read():
    # autokd.nn sits below autokd.space: names, mappings and YAML become specs there
    spec = DistillerSpec.coerce("kd")
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    out = DistillLoss(spec)(student_logits=s, teacher_logits=t)
    assert torch.isfinite(out.loss_kd)
    for value in ("kd", {"logit_distance": "kl"}):
        with pytest.raises(
            TypeError,
            match=r"DistillLoss: expected a DistillerSpec, got "
            r"(str|dict) .*DistillerSpec\.coerce",
        ):
            DistillLoss(value)
