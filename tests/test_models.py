import sys
import textwrap

import pytest
import torch
from torch import nn

from autokd.models import MODELS, build_model, count_parameters, default_taps, list_models

DIGITS = {"digits_teacher", "digits_student"}


def _tap_outputs(model, taps, x):
    found = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[t].register_forward_hook(lambda m, i, o, t=t: found.__setitem__(t, o)) for t in taps
    ]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, found


def test_zoo_lists_the_cifar_family_and_the_digits_pair():
    expected = (
        {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)}
        | {
            "resnet8x4",
            "resnet32x4",
            "wrn_16_2",
            "wrn_40_2",
            "vgg8",
            "vgg13",
            "mobilenetv2",
            "shufflenetv1",
            "shufflenetv2",
            "vit_compact",
            "vit_tiny",
        }
        | DIGITS
    )
    assert set(list_models()) == expected


@pytest.mark.parametrize("name", list_models())
def test_builds_forwards_and_taps_features(name):
    in_ch = 1 if name in DIGITS else 3
    model = build_model(name, num_classes=7, in_channels=in_ch).eval()
    taps = default_taps(name)
    assert taps and all(t in dict(model.named_modules()) for t in taps)
    sizes = (8, 32) if name not in DIGITS else (8, 16)
    with torch.no_grad():
        for s in sizes:
            logits, feats = _tap_outputs(model, taps, torch.randn(1, in_ch, s, s))
            assert logits.shape == (1, 7)
            assert torch.isfinite(logits).all()
            for t in taps:
                assert feats[t].dim() == 4 and feats[t].shape[0] == 1, (name, t, feats[t].shape)


@pytest.mark.parametrize("name", ["resnet20", "vgg8", "digits_teacher"])
def test_other_input_channels(name):
    model = build_model(name, num_classes=3, in_channels=4)
    assert model(torch.randn(2, 4, 8, 8)).shape == (2, 3)


# Published counts: He et al. (CIFAR-10 ResNets); the CIFAR-100 counts reported with the CRD
# family of models in the distillation literature.
@pytest.mark.parametrize(
    "name,classes,published",
    [
        ("resnet20", 10, 0.27e6),
        ("resnet56", 10, 0.85e6),
        ("resnet110", 10, 1.7e6),
        ("resnet8x4", 100, 1.23e6),
        ("resnet32x4", 100, 7.43e6),
        ("wrn_16_2", 100, 0.70e6),
        ("wrn_40_2", 100, 2.25e6),
        ("vgg8", 100, 3.96e6),
        ("vgg13", 100, 9.46e6),
        ("mobilenetv2", 100, 0.81e6),
        ("shufflenetv1", 100, 0.95e6),
        ("shufflenetv2", 100, 1.35e6),
    ],
)
def test_parameter_counts_match_published(name, classes, published):
    n = count_parameters(build_model(name, num_classes=classes, in_channels=3))
    assert abs(n - published) / published < 0.03, n


def test_digits_student_is_much_smaller_than_teacher():
    t = count_parameters(build_model("digits_teacher", num_classes=10, in_channels=1))
    s = count_parameters(build_model("digits_student", num_classes=10, in_channels=1))
    assert 20_000 <= t <= 100_000 and s * 10 < t


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="resnet20"):
        build_model("resnet21", num_classes=10)
    with pytest.raises(KeyError, match="wrn_40_2"):
        default_taps("wrn40_2")


def test_registry_build_from_config():
    m = MODELS.build({"key": "resnet8", "kwargs": {"num_classes": 5}}, in_channels=2)
    assert m(torch.randn(1, 2, 8, 8)).shape == (1, 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet8", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet8", num_classes=10, in_channels=0)


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_model_adapts_first_conv_and_finds_taps():
    m = build_model("tv:resnet18", num_classes=7, in_channels=1)
    assert m.conv1.in_channels == 1
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert default_taps("tv:resnet18", m) == ["layer4"]
    assert default_taps("tv:mobilenet_v2") == ["features"]


def test_torchvision_unknown_name():
    with pytest.raises(KeyError, match="tv:resnet18"):
        build_model("tv:resnet19", num_classes=10)


# ------------------------------------------------------------------------------ user models


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "autokd_user_models.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn

        def tiny(num_classes, in_channels):
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

        def no_channels(num_classes):
            return tiny(num_classes, 3)

        def not_a_module(num_classes, in_channels):
            return 42
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("autokd_user_models", None)


def test_user_factory(user_module):
    m = build_model("autokd_user_models:tiny", num_classes=3, in_channels=2)
    assert m(torch.randn(2, 2, 8, 8)).shape == (2, 3)
    m = build_model(f"{user_module / 'autokd_user_models.py'}:tiny", num_classes=4, in_channels=1)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="explicitly"):
        default_taps("autokd_user_models:tiny")


def test_user_factory_errors(user_module):
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        build_model("no_such_module_xyz:make", num_classes=3)
    with pytest.raises(AttributeError, match="'tiny'"):
        build_model("autokd_user_models:tinny", num_classes=3)
    with pytest.raises(TypeError, match="in_channels"):
        build_model("autokd_user_models:no_channels", num_classes=3)
    with pytest.raises(TypeError, match="nn.Module"):
        build_model("autokd_user_models:not_a_module", num_classes=3)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        build_model(f"{user_module / 'missing.py'}:tiny", num_classes=3)


def test_taps_are_the_last_stage_before_pooling():
    # The tapped map feeds global pooling and the classifier directly: pooling it and applying
    # the classifier reproduces the logits.
    model = build_model("resnet20", num_classes=10).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        logits, feats = _tap_outputs(model, default_taps("resnet20"), x)
        again = model.fc(feats["layer3"].mean(dim=(2, 3)))
    assert torch.allclose(logits, again, atol=1e-5)
    assert isinstance(model.fc, nn.Linear)
