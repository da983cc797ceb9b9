"""The search space: every design builds a finite, differentiable loss; registries, specs and
spaces validate their input; YAML round trips."""

import random

import pytest
import torch

from autokd.errors import PipelineError
from autokd.nn import DistillLoss
from autokd.nn.blocks import needs_size_match
from autokd.search.mcts import MCTS
from autokd.space import (
    FEATURE_DISTANCES,
    LOGIT_DISTANCES,
    SCHEDULES,
    TRANSFORMS,
    DistillerSpec,
    SearchSpace,
    SpecError,
    list_distillers,
    list_spaces,
    load_distiller,
    load_space,
)
from autokd.train.final import resolve_spec

FEATURE_LEVELS = ("global_transform", "intra_spatial", "inter_spatial", "feature_distance")
LOGIT_LEVELS = ("logit_distance", "temperature")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more


def tiny_inputs():
    # mismatched channels (6 vs 4) and sizes (5x3 vs 4x4), three samples, seven classes
    fs = torch.randn(3, 6, 5, 3, requires_grad=True)
    ft = torch.randn(3, 4, 4, 4)
    ls = torch.randn(3, 7, requires_grad=True)
    lt = torch.randn(3, 7) * 2
    return fs, ft, ls, lt


def assert_finite_differentiable(spec, inputs, channels=(6, 4)):
    fs, ft, ls, lt = inputs
    loss = DistillLoss(spec, channels)
    out = loss(fs, ft, ls, lt, labels=torch.arange(ls.shape[0]) % ls.shape[1])  # DKD reads labels
    assert out.loss_kd.dim() == 0 and torch.isfinite(out.loss_kd), spec.to_dict()
    wrt = []
    if spec.feature_distance.key != "none":
        wrt.append(fs)
    if spec.logit_distance.key != "none":
        wrt.append(ls)
    wrt += [p for p in loss.parameters() if p.requires_grad]
    if not wrt:
        return out
    grads = torch.autograd.grad(out.loss_kd, wrt, allow_unused=True)
    # the student side always reaches the loss (a dropped mask may leave its gradient 0)
    assert all(g is not None for g in grads[:1]), spec.to_dict()
    assert all(torch.isfinite(g).all() for g in grads if g is not None), spec.to_dict()
    return out


@pytest.mark.parametrize("name", list_spaces())
def test_engine_counts_the_designs_the_space_enumerates(name):
    # The design count is the engine's (one count in the project); on every shipped space it
    # must agree with the designs the space enumerates (and builds specs from).
    space = load_space(name)
    assert MCTS(space.engine_levels()).num_designs() == sum(1 for _ in space.designs())


def test_paper_space_size_and_engine_levels():
    space = load_space("autokd")
    assert MCTS(space.engine_levels()).num_designs() == 10692
    levels = space.engine_levels()
    assert [lv["name"] for lv in levels] == [
        "global_transform",
        "intra_spatial",
        "inter_spatial",
        "feature_distance",
        "feature_weight",
        "logit_distance",
        "temperature",
        "logit_weight",
    ]
    assert levels[6] == {
        "name": "temperature",
        "options": ["1", "2", "4", "8"],
        "requires": {"logit_distance": ["kl", "pearson"]},
    }
    assert all(isinstance(o, str) for lv in levels for o in lv["options"])


def test_every_paper_design_builds_a_finite_differentiable_loss():
    """Exhaustive over the 10,692 designs. A design's loss is W_f * D_f + W_p * D_p, so each of
    the 81 feature parts (4 weights each) and 9 logit parts is built and differentiated once
    (reused), and every design is checked to build, to round trip, and to combine exactly those
    parts."""
    space = load_space("autokd")
    inputs = tiny_inputs()
    fs, ft, ls, lt = inputs
    feature_part, logit_part = {}, {}
    for design in space.designs():
        spec = space.spec_from_design(design)
        assert space.design_from_spec(spec) == design
        fkey = tuple(design[k] for k in FEATURE_LEVELS)
        if fkey not in feature_part:
            part = spec.replace(logit_distance="none", feature_weight=1.0)
            torch.manual_seed(0)
            feature_part[fkey] = assert_finite_differentiable(part, inputs).loss_feature.detach()
        lkey = tuple(design.get(k) for k in LOGIT_LEVELS)
        if lkey not in logit_part:
            part = spec.replace(feature_distance="none", logit_weight=1.0)
            logit_part[lkey] = assert_finite_differentiable(part, inputs).loss_logit.detach()
        total = spec.feature_weight * feature_part[fkey]
        if spec.logit_distance.key != "none":
            total = total + spec.logit_weight * logit_part[lkey]
        assert torch.isfinite(total)
    assert len(feature_part) == 81 and len(logit_part) == 9
    # spot-check the composition on whole specs (mask drawn with the same seed)
    rng = random.Random(1)
    designs = list(space.designs())
    for design in rng.sample(designs, 40):
        spec = space.spec_from_design(design)
        torch.manual_seed(0)
        out = DistillLoss(spec, (6, 4))(fs, ft, ls, lt)
        expect = spec.feature_weight * feature_part[tuple(design[k] for k in FEATURE_LEVELS)]
        if spec.logit_distance.key != "none":
            expect = (
                expect + spec.logit_weight * logit_part[tuple(design.get(k) for k in LOGIT_LEVELS)]
            )
        assert torch.allclose(out.loss_kd.detach(), expect, rtol=1e-5, atol=1e-6)


def test_random_extended_designs_build_finite_differentiable_losses():
    space = load_space("extended")
    assert MCTS(space.engine_levels()).num_designs() == 112887
    rng = random.Random(0)
    inputs = tiny_inputs()
    seen = set()
    for _ in range(250):
        design = space.sample(rng)
        spec = space.spec_from_design(design)
        assert space.design_from_spec(spec) == design
        assert_finite_differentiable(spec, inputs)
        seen.add(spec.feature_distance.key)
    assert {"renyi", "gram_l2_embed", "none"} <= seen


@pytest.mark.parametrize(
    "schedule,progress,factor",
    [
        ("constant", 0.9, 1.0),
        ("warm-up", 0.1, 0.5),
        ("warm-up", 0.5, 1.0),
        ("early-stop", 0.5, 1.0),
        ("early-stop", 0.8, 0.0),
    ],
)
def test_schedules_scale_both_terms(schedule, progress, factor):
    fs, ft, ls, lt = tiny_inputs()
    spec = DistillerSpec.from_dict(
        {
            "feature_distance": "l2",
            "logit_distance": "kl",
            "schedule": schedule,
            "feature_weight": 5,
            "logit_weight": 0.5,
            "temperature": 2,
        }
    )
    m = DistillLoss(spec, (6, 4))
    base = DistillLoss(spec.replace(schedule="constant"), (6, 4))
    base.load_state_dict(m.state_dict())
    m.set_progress(progress)
    a, b = m(fs, ft, ls, lt), base(fs, ft, ls, lt)
    assert torch.allclose(a.loss_feature, factor * b.loss_feature)
    assert torch.allclose(a.loss_logit, factor * b.loss_logit)


# -- registries -------------------------------------------------------------------------------


def test_registries_hold_every_option():
    assert set(TRANSFORMS.keys()) >= {
        "global/original",
        "global/attention",
        "global/mask",
        "intra/original",
        "intra/multi-scale",
        "intra/local",
        "inter/original",
        "inter/sample-wise",
        "inter/channel-wise",
    }
    assert set(FEATURE_DISTANCES.keys()) >= {"l2", "kl", "gram_l2", "renyi", "gram_l2_embed"}
    assert set(LOGIT_DISTANCES.keys()) >= {"kl", "pearson", "kl_std"}
    assert set(SCHEDULES.keys()) == {"constant", "warm-up", "early-stop"}


def test_registry_errors():
    with pytest.raises(KeyError, match="already registered"):
        FEATURE_DISTANCES.register("l2", object)
    with pytest.raises(KeyError, match=r"did you mean 'gram_l2'.*Known:"):
        FEATURE_DISTANCES.get("gram_l3")
    with pytest.raises(KeyError, match="unknown distiller 'cdw'; did you mean 'cwd'"):
        load_distiller("cdw")
    with pytest.raises(KeyError, match="unknown search space"):
        load_space("nope")


# -- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,pattern",
    [
        (
            {"feature_distanse": "l2"},
            r"unknown field\(s\) \['feature_distanse'\]; valid fields: name, global_transform",
        ),
        (
            {"feature_distance": "l3"},
            r"'feature_distance': invalid value 'l3'; "
            r"allowed: none, gram_l2, gram_l2_embed, kl, l2, renyi",
        ),
        (
            {"inter_spatial": "row-wise"},
            r"'inter_spatial': invalid value 'row-wise'; allowed: .*channel-wise",
        ),
        ({"temperature": 0}, r"'temperature': invalid value 0; allowed: a finite number > 0"),
        ({"logit_weight": "heavy"}, r"'logit_weight': invalid value 'heavy'"),
        (
            {"adapter": "sometimes"},
            r"'adapter': invalid value 'sometimes'; allowed: auto, always, never",
        ),
        (
            {"feature_distance": {"key": "kl", "kwargs": {"tauu": 2}}},
            r"unknown kwargs \['tauu'\] for 'kl'; valid: tau",
        ),
        (
            {"feature_distance": {"key": "kl", "kwargs": {"tau": -1}}},
            r"'feature_distance': kl tau: expected a positive number, got -1",
        ),
        ({"feature_distance": {"kee": "kl"}}, r"expected a name or \{key: ..., kwargs"),
        (
            {"feature_distance": "renyi", "global_transform": "attention"},
            r"'global_transform': invalid value 'attention' with the embedding distance 'renyi'",
        ),
        (
            {"global_transform": {"key": "mask", "kwargs": {"ratio": 1.5}}},
            r"mask ratio: expected a number in \[0, 1\), got 1.5",
        ),
    ],
)
def test_spec_validation_errors(data, pattern):
    with pytest.raises(SpecError, match=pattern):
        DistillerSpec.from_dict(data)


def test_spec_yaml_round_trip(tmp_path):
    for name in list_distillers():
        spec = load_distiller(name)
        assert spec.name == name
        assert DistillerSpec.from_yaml(spec.to_yaml()) == spec
        assert DistillerSpec.from_dict(spec.to_dict()) == spec
    space = load_space("extended")
    rng = random.Random(3)
    for _ in range(50):
        spec = space.spec_from_design(space.sample(rng), name="x")
        path = tmp_path / "s.yaml"
        path.write_text(spec.to_yaml())
        assert DistillerSpec.from_yaml(path) == spec == DistillerSpec.from_yaml(str(path))
    spec = DistillerSpec.from_yaml(
        "feature_distance: {key: kl, kwargs: {tau: 4}}\nlogit_distance: kl\n"
    )
    assert spec.feature_distance.kwargs == {"tau": 4} and spec.to_dict()["feature_distance"] == {
        "key": "kl",
        "kwargs": {"tau": 4},
    }
    with pytest.raises(FileNotFoundError):
        DistillerSpec.from_yaml("missing.yaml")


def test_design_from_spec_rejects_specs_outside_the_space():
    space = load_space("autokd")
    with pytest.raises(ValueError, match=r"field 'feature_distance' is 'none'"):
        space.design_from_spec(load_distiller("kd"))
    with pytest.raises(
        ValueError, match=r"field 'feature_distance' is \{'key': 'kl', 'kwargs': \{'tau': 4.0\}\}"
    ):
        space.design_from_spec(load_distiller("cwd"))
    with pytest.raises(
        ValueError, match=r"field 'feature_weight' is 3.0; the space allows 1, 5, 25, 50"
    ):
        space.design_from_spec(load_distiller("cwd").replace(feature_distance="kl"))
    ok = load_distiller("cwd").replace(feature_distance="kl", feature_weight=5, name=None)
    assert space.design_from_spec(ok)["inter_spatial"] == "channel-wise"
    assert (
        load_space("extended").design_from_spec(load_distiller("kd").replace(logit_weight=1))[
            "logit_distance"
        ]
        == "kl"
    )


def test_design_errors():
    space = load_space("autokd")
    design = space.sample(random.Random(0))
    with pytest.raises(ValueError, match="missing level 'feature_weight'"):
        space.spec_from_design({k: v for k, v in design.items() if k != "feature_weight"})
    bad = dict(design, intra_spatial="multiscale")
    with pytest.raises(
        ValueError, match=r"invalid option 'multiscale' \(did you mean 'multi-scale'\?\)"
    ):
        space.spec_from_design(bad)
    no_logit = dict(
        {k: v for k, v in design.items() if k not in ("temperature", "logit_weight")},
        logit_distance="none",
    )
    space.spec_from_design(no_logit)
    with pytest.raises(
        ValueError, match=r"level\(s\) \['temperature'\] are not part of this design"
    ):
        space.spec_from_design(dict(no_logit, temperature="4"))


@pytest.mark.parametrize(
    "levels,pattern",
    [
        ([{"name": "feature_distanse", "options": ["l2"]}], "unknown level name"),
        ([{"name": "feature_distance", "options": []}], "expected at least one option"),
        ([{"name": "feature_distance", "options": ["l2", "l2"]}], r"duplicate options \['l2'\]"),
        ([{"name": "feature_distance", "options": ["l2", "l7"]}], "invalid option 'l7'"),
        (
            [
                {"name": "temperature", "options": [1, 2], "requires": {"logit_distance": ["kl"]}},
                {"name": "logit_distance", "options": ["kl"]},
            ],
            "requires 'logit_distance', which is not an earlier level",
        ),
        (
            [
                {"name": "logit_distance", "options": ["kl"]},
                {
                    "name": "temperature",
                    "options": [1],
                    "requires": {"logit_distance": ["pearson"]},
                },
            ],
            "has options",
        ),
        (
            [
                {"name": "logit_distance", "options": ["kl"]},
                {"name": "logit_distance", "options": ["kl"]},
            ],
            "duplicate level",
        ),
        ([{"name": "feature_weight", "options": [0]}], "invalid option '0'"),
    ],
)
def test_space_validation_errors(levels, pattern):
    with pytest.raises(ValueError, match=pattern):
        SearchSpace.from_dict({"name": "t", "levels": levels})


def test_space_from_yaml_path(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(
        "levels:\n  - {name: logit_distance, options: [none, kl]}\n"
        "  - {name: temperature, options: [1, 4], requires: {logit_distance: kl}}\n"
    )
    space = load_space(path)
    assert space.name == "mini" and MCTS(space.engine_levels()).num_designs() == 3
    assert space.spec_from_design({"logit_distance": "kl", "temperature": "4"}).temperature == 4.0


def test_distill_loss_on_several_feature_levels_like_fpn():
    import autokd.nn

    spec = load_distiller("cwd")
    loss = autokd.nn.DistillLoss(spec, channels=[(8, 16)] * 3)
    assert sum(p.adapter is not None for p in loss.pairs) == 3
    fs = [torch.randn(2, 8, s, s, requires_grad=True) for s in (16, 8, 4)]
    ft = [torch.randn(2, 16, s, s) for s in (16, 8, 4)]
    out = loss(fs, ft)
    assert torch.isfinite(out.loss_kd) and out.mu.shape == (3,)
    assert torch.allclose(out.mu.sum(), torch.tensor(1.0))
    out.loss_kd.backward()
    assert all(torch.isfinite(f.grad).all() for f in fs)
    with pytest.raises(
        ValueError, match="expected 3 student and teacher feature tensors, got 2 and 3"
    ):
        loss(fs[:2], ft)


def test_classic_distillers_are_looked_up_in_one_place(tmp_path):
    # `autokd-cli distill --spec NAME` (resolve_spec) and DistillerSpec.coerce("NAME") go through
    # load_distiller: the same spec, the same error with close matches and the known names.
    assert resolve_spec("cwd") == load_distiller("cwd") == DistillerSpec.coerce("cwd")
    with pytest.raises(KeyError) as via_cli:
        resolve_spec("cdw")
    with pytest.raises(KeyError) as via_space:
        load_distiller("cdw")
    assert via_cli.value.args == via_space.value.args
    assert (
        "did you mean 'cwd'" in via_cli.value.args[0] and "Known: at, cwd" in via_cli.value.args[0]
    )
    path = tmp_path / "mine.yaml"
    path.write_text(load_distiller("kd").replace(temperature=8.0).to_yaml())
    assert resolve_spec(str(path)).temperature == 8.0
    with pytest.raises(PipelineError, match="no such file"):
        resolve_spec(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("key", [k for k in TRANSFORMS if k.startswith("global/")])
def test_global_transforms_that_relate_positions_get_maps_of_one_size(key):
    # A global transform declares needs_same_size; the feature loss honours it even where the
    # later levels would not compare positions (a sample-wise Gram compares samples only).
    spec = DistillerSpec.from_dict(
        {
            "global_transform": key.split("/", 1)[1],
            "inter_spatial": "sample-wise",
            "feature_distance": "gram_l2",
        }
    )
    assert needs_size_match(spec) == TRANSFORMS.get(key).needs_same_size
    loss = DistillLoss(spec, [(4, 4)])
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = loss([s], [torch.randn(2, 4, 3, 3)], torch.randn(2, 5), torch.randn(2, 5))
    out.loss_kd.backward()
    assert torch.isfinite(s.grad).all()
