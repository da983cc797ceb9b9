"""Vision-transformer students: the zoo's ViTs and timm: models, token features as NCHW maps
under every transform of the search space, AdamW with warm-up + cosine (dense and masked under
sparsity), the per-model defaults the CLI applies, and one-line errors for bad names and taps."""

import itertools
import math
import random

import pytest
import torch
from click.testing import CliRunner

from autokd.cli import main
from autokd.distill import Distiller
from autokd.models import build_model, count_parameters, default_taps, training_defaults
from autokd.models.vit import TokenMap
from autokd.nn.taps import FeatureTaps
from autokd.space import load_space
from autokd.train.loop import TrainConfig, cosine_lr

TIMM_VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=4"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _map(name, x, in_channels=None):
    model = build_model(name, num_classes=10, in_channels=in_channels or x.shape[1])
    taps = FeatureTaps(model, default_taps(name))
    logits = model(x)
    return model, logits, taps.take()["token_map"]


def test_token_map_puts_each_patch_token_at_its_grid_position():
    n, d, gh, gw = 2, 5, 3, 4
    tokens = torch.randn(n, 2 + gh * gw, d)  # 2 prefix tokens (class + distillation)
    m = TokenMap(prefix=2)(tokens, (gh, gw))
    assert m.shape == (n, d, gh, gw)
    for r in range(gh):
        for c in range(gw):
            assert torch.equal(m[:, :, r, c], tokens[:, 2 + r * gw + c])
    with pytest.raises(ValueError, match=r"expected 2 prefix tokens \+ 3x3 patch tokens, got 14"):
        TokenMap(prefix=2)(tokens, (3, 3))


def test_zoo_vits_sizes_and_maps():
    model, logits, fmap = _map("vit_compact", torch.randn(2, 1, 8, 8))
    assert count_parameters(model) < 300_000 and logits.shape == (2, 10)
    assert fmap.shape == (2, 64, 4, 4)  # 2x2 patches: the digits CNNs' 4x4 tap grid
    # position embeddings are interpolated: the same model takes 16x16 input
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)
    _, _, fmap = _map("vit_compact?patch_size=4", torch.randn(2, 3, 32, 32))
    assert fmap.shape == (2, 64, 8, 8)
    tiny = build_model("vit_tiny", num_classes=100, in_channels=3)
    assert 5_000_000 < count_parameters(tiny) < 6_000_000  # DeiT-Tiny's width and depth
    with pytest.raises(
        ValueError,
        match=r"got 10x10; build it with a patch size that divides "
        r"them, e.g. '\?patch_size=2'",
    ):
        build_model("vit_compact?patch_size=4", 10, 1)(torch.randn(1, 1, 10, 10))


def test_timm_vits_expose_patch_tokens_as_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    model, logits, fmap = _map(TIMM_VIT, x)
    assert logits.shape == (2, 10) and fmap.shape == (2, 192, 8, 8)
    tokens = model.model.forward_features(x)
    assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens[:, 1:])
    assert torch.equal(logits, model.model.forward_head(tokens))
    _, _, fmap = _map(
        "timm:deit_tiny_distilled_patch16_224?img_size=32&patch_size=4", torch.randn(2, 3, 32, 32)
    )
    assert fmap.shape == (2, 192, 8, 8)  # class and distillation tokens dropped


@pytest.mark.parametrize(
    "name,error,match",
    [
        ("timm:vit_tinyy", KeyError, r"unknown timm model 'timm:vit_tinyy'; did you mean timm:"),
        (
            TIMM_VIT + "&pretrained=true",
            ValueError,
            r"option\(s\) \['pretrained'\] would load or download weights",
        ),
        (
            "timm:vit_tiny_patch16_224?depthh=2",
            ValueError,
            r"timm cannot build it \(TypeError: .*unexpected keyword argument 'depthh'\)",
        ),
        (
            "vit_compact?patch=2",
            ValueError,
            r"unknown option\(s\) \['patch'\] for 'vit_compact'; valid: img_size, patch_size",
        ),
        ("resnet20?width=2", ValueError, r"option\(s\) \['width'\] for 'resnet20'; valid: none"),
        ("vit_compact?patch_size", ValueError, r"expected options as '\?key=value&key=value'"),
    ],
)
def test_bad_model_names_and_options(name, error, match):
    with pytest.raises(error, match=match):
        build_model(name, num_classes=10, in_channels=3)


def test_every_transform_of_the_space_applies_to_a_vit_student_of_a_cnn_teacher():
    torch.manual_seed(0)
    student = build_model("vit_compact", num_classes=10, in_channels=1)
    teacher = build_model("digits_teacher", num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    space = load_space("autokd")
    rng = random.Random(0)
    seen = set()
    blocks = list(student.blocks[-1].parameters())
    for _ in range(12):
        spec = space.spec_from_design(space.sample(rng))
        d = Distiller(
            spec,
            student,
            ["token_map"],
            teacher_taps=["features"],
            teacher=teacher,
            example_input=x[:2],
        )
        out = d(x)
        grads = torch.autograd.grad(out.loss_feature, blocks, allow_unused=True)
        assert torch.isfinite(out.loss_kd), spec.label()
        assert any(g is not None and g.abs().sum() > 0 for g in grads), spec.label()
        seen.update(
            getattr(spec, f).key
            for f in ("global_transform", "intra_spatial", "inter_spatial", "feature_distance")
        )
        d.remove_hooks()
    assert {"attention", "mask", "multi-scale", "local", "channel-wise", "sample-wise"} <= seen


def test_warm_up_then_cosine():
    base, total, warm = 1e-3, 100, 10
    lrs = [cosine_lr(base, s, total, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm) and lrs[warm - 1] == pytest.approx(base)
    assert all(a < b for a, b in itertools.pairwise(lrs[:warm]))
    assert lrs[warm] == pytest.approx(base) and lrs[-1] < 1e-3 * base
    assert all(a >= b for a, b in itertools.pairwise(lrs[warm:]))
    assert [cosine_lr(base, s, total) for s in range(total)] == [
        0.5 * base * (1 + math.cos(math.pi * s / total)) for s in range(total)
    ]
    with pytest.raises(ValueError, match=r"expected optimizer one of sgd, adamw, got 'adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match=r"expected warmup_epochs in \[0, epochs = 4\), got 4"):
        TrainConfig(epochs=4, warmup_epochs=4)


def test_per_model_defaults():
    assert training_defaults("digits_student") == {} and training_defaults("tv:resnet18") == {}
    vit = training_defaults("vit_compact?patch_size=4", epochs=60)
    assert vit == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5.0}
    assert training_defaults(TIMM_VIT, epochs=20)["warmup_epochs"] == 2.0


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_vit_trains_with_adamw_without_decay_on_norms_and_embeddings(sparsity):
    from types import SimpleNamespace

    from autokd.train.loop import train_student

    g = torch.Generator().manual_seed(0)
    train = SimpleNamespace(
        images=torch.randn(32, 1, 8, 8, generator=g), labels=torch.arange(32) % 10
    )
    torch.manual_seed(0)
    student = build_model("vit_compact?depth=2", num_classes=10, in_channels=1)
    d = Distiller("none", student)
    before = student.pos_embed.detach().clone()
    cfg = TrainConfig(
        epochs=2,
        batch_size=16,
        lr=1e-3,
        weight_decay=0.05,
        optimizer="adamw",
        warmup_epochs=1,
        sparsity=sparsity,
        offline=False,
    )
    res = train_student(d, student, SimpleNamespace(train=train), cfg)
    assert math.isfinite(res.final_loss) and res.steps == 4
    assert not torch.equal(before, student.pos_embed)
    w = student.blocks[0].mlp[0].weight
    if sparsity:
        assert (w == 0).float().mean().item() >= 0.45  # masked AdamW keeps the pruned weights 0
    # position embeddings and the class token are never pruned
    assert (student.pos_embed != 0).all() and (student.cls_token != 0).all()


def test_cli_vit_student_distills_and_searches_with_adamw(tmp_path):
    out = str(tmp_path)
    toy = ["--teacher-epochs", "1", "--quiet", "--out", out, "--student", "vit_compact"]
    r = CliRunner().invoke(main, ["distill", "--spec", "kd", "--epochs", "1", *toy])
    assert r.exit_code == 0, r.output
    ck = torch.load(f"{out}/distill-kd-0/checkpoint.pt", weights_only=True)
    cfg = ck["pinned"]["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == ("adamw", 1e-3, 0.05)
    assert cfg["warmup_epochs"] == pytest.approx(0.1)
    r = CliRunner().invoke(
        main, ["distill", "--spec", "none", "--epochs", "1", "--lr", "0.01", *toy]
    )
    assert r.exit_code == 0, r.output
    ck = torch.load(f"{out}/distill-none-0/checkpoint.pt", weights_only=True)
    assert ck["pinned"]["config"]["lr"] == 0.01 and ck["pinned"]["config"]["optimizer"] == "adamw"
    r = CliRunner().invoke(
        main,
        ["search", "--budget", "2", "--epochs", "5", "--views", "1", "--space", "extended", *toy],
    )
    assert r.exit_code == 0, r.output
    assert "best spec:" in r.output
    # mistakes: one line each
    for args, match in (
        (
            ["--student", "timm:vit_tinyy"],
            "Error: unknown timm model 'timm:vit_tinyy'; did you mean",
        ),
        (
            ["--student-taps", "token_mapp"],
            (
                "Error: Distiller: student: 'token_mapp' names no module of VisionTransformer; did "
                "you mean 'token_map'?"
            ),
        ),
    ):
        r = CliRunner().invoke(main, ["distill", "--spec", "fitnet", "--epochs", "1", *toy, *args])
        errors = [line for line in r.output.splitlines() if line.startswith("Error")]
        assert r.exit_code == 1 and len(errors) == 1 and errors[0].startswith(match), r.output
        assert r.output.endswith(errors[0] + "\n"), r.output
