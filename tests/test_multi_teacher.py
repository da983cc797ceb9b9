"""Several teachers: --teacher a,b from the CLI (search, distill, cache, train-teacher), one
feature store per teacher read together, the journal pinning every teacher, the logit term of
several teachers, and one-line messages for lists that do not fit together."""

import copy
import json
import os
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from autokd.cli import main
from autokd.data import load_data
from autokd.distill import Distiller
from autokd.errors import PipelineError
from autokd.models import build_model
from autokd.nn.blocks import DistillLoss
from autokd.pipeline import (
    load_or_train_teachers,
    make_augment,
    teacher_file,
    teacher_plan,
)
from autokd.search.driver import SearchConfig
from autokd.search.trial import TrialSetup, prepare
from autokd.space import DistillerSpec
from autokd.store import FeatureStore, TeacherStores, pinned_teacher_hash

pytestmark = pytest.mark.usefixtures("one_thread_module")

TEACHERS = "digits_teacher,resnet8"  # different architectures, different default taps
# Toy scale: teachers of 1 epoch, trials of 1 epoch on 20% of the data.
TOY = [
    "--teacher-epochs",
    "1",
    "--epochs",
    "5",
    "--stop-fraction",
    "0.2",
    "--views",
    "2",
    "--quiet",
]
SPEC = DistillerSpec.from_dict(
    {
        "global_transform": "original",
        "intra_spatial": "original",
        "inter_spatial": "channel-wise",
        "feature_distance": "l2",
        "feature_weight": 5,
        "logit_distance": "kl",
        "temperature": 4,
        "logit_weight": 1,
    }
)


def _config(out):
    db = sqlite3.connect(os.path.join(out, "journal.sqlite"))
    try:
        return json.loads(dict(db.execute("SELECT key, value FROM meta"))["config"])
    finally:
        db.close()


def _trials(out):
    db = sqlite3.connect(os.path.join(out, "journal.sqlite"))
    try:
        return db.execute("SELECT id, design, reward FROM trials ORDER BY id").fetchall()
    finally:
        db.close()


def _one_line_error(r, message):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], r.output


# -- the list of teachers ------------------------------------------------------------------------


def test_plan_pairs_names_checkpoints_and_taps():
    plan = teacher_plan("a, b", "a.pt,", [["x1", "x2"], None])
    assert [(e.name, e.checkpoint, e.taps) for e in plan] == [
        ("a", "a.pt", ["x1", "x2"]),
        ("b", None, None),
    ]
    shared = teacher_plan(["a", "b"], None, ["t"])
    assert [e.taps for e in shared] == [["t"], ["t"]]
    one = teacher_plan("a", "a.pt", ["t1", "t2"])
    assert [(e.name, e.checkpoint, e.taps) for e in one] == [("a", "a.pt", ["t1", "t2"])]


def test_a_checkpoint_whose_name_holds_a_comma_is_one_file(tmp_path):
    path = tmp_path / "teacher,v2.pt"
    path.write_bytes(b"x")
    assert [e.checkpoint for e in teacher_plan("a", str(path))] == [str(path)]


@pytest.mark.parametrize(
    "names, checkpoints, taps, message",
    [
        (
            "a,b",
            "a.pt",
            None,
            ("expected one --teacher-checkpoint per --teacher (2 teachers: a, b), got 1"),
        ),
        ("a", "a.pt,b.pt", None, "(1 teacher: a), got 2"),
        (
            "a,b",
            None,
            [["x"], ["y"], ["z"]],
            ("expected one --teacher-taps list per teacher (2 teachers: a, b"),
        ),
        ("a,,b", None, None, "got an empty entry"),
    ],
)
def test_plan_refuses_lists_that_do_not_fit(names, checkpoints, taps, message):
    with pytest.raises(PipelineError) as e:
        teacher_plan(names, checkpoints, taps)
    assert message in str(e.value)


def test_teacher_files_keep_the_one_teacher_names():
    assert teacher_file("/r/teacher.pt", 0) == "/r/teacher.pt"
    assert teacher_file("/r/teacher.pt", 1) == "/r/teacher-1.pt"
    assert teacher_file("/r/teacher_features.akds", 2) == "/r/teacher_features-2.akds"


def test_teachers_of_one_architecture_train_with_their_own_seeds(tmp_path):
    data = load_data("digits", seed=0)
    ts = load_or_train_teachers(
        data,
        "digits_student,digits_student",
        None,
        str(tmp_path / "teacher.pt"),
        epochs=1,
        log=lambda _m: None,
        progress=False,
    )
    assert [os.path.basename(t.checkpoint) for t in ts] == ["teacher.pt", "teacher-1.pt"]
    assert ts[0].hash != ts[1].hash  # an ensemble of two models, not one model twice
    assert pinned_teacher_hash(ts) == [ts[0].hash, ts[1].hash]
    assert pinned_teacher_hash(ts[:1]) == ts[0].hash  # one teacher: the key it always had
    # a second run finds both files and trains nothing
    again = load_or_train_teachers(
        data,
        "digits_student,digits_student",
        None,
        str(tmp_path / "teacher.pt"),
        epochs=1,
        log=lambda _m: None,
        progress=False,
    )
    assert [t.hash for t in again] == [t.hash for t in ts]


# -- the logit term of several teachers ---------------------------------------------------------


def test_logit_term_is_the_mean_of_the_teachers_distances_and_kl_matches_mean_probabilities():
    torch.manual_seed(0)
    spec = DistillerSpec.coerce("kd")
    loss = DistillLoss(spec)
    s = torch.randn(6, 10, requires_grad=True)
    t1, t2 = torch.randn(6, 10) * 3, torch.randn(6, 10)
    both = loss(None, None, s, [t1, t2]).loss_logit
    alone = [loss(None, None, s, t).loss_logit for t in (t1, t2)]
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2)
    # KL: the mean of the per-teacher losses trains the student as the KL to the teachers' mean
    # tempered probabilities does (the same gradient), the reason for the mean of the losses
    (g_mean,) = torch.autograd.grad(both, s)
    tau = spec.temperature
    q = (F.softmax(t1 / tau, 1) + F.softmax(t2 / tau, 1)) / 2
    s2 = s.detach().clone().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(s2 / tau, 1), q, reduction="batchmean") * tau * tau
    (g_prob,) = torch.autograd.grad(spec.logit_weight * kl, s2)
    torch.testing.assert_close(g_mean, g_prob, rtol=1e-4, atol=1e-6)
    # two copies of one teacher are that teacher
    torch.testing.assert_close(loss(None, None, s, [t1, t1]).loss_logit, alone[0])


def test_logit_term_refuses_no_teachers_and_logits_of_another_shape():
    loss = DistillLoss(DistillerSpec.coerce("kd"))
    s = torch.randn(4, 10)
    with pytest.raises(ValueError, match="expected the logits of 1 or more teachers"):
        loss(None, None, s, [])
    with pytest.raises(
        ValueError,
        match=r"expected teacher 1's logits of the student's shape "
        r"\[4, 10\], got \[4, 7\]",
    ):
        loss(None, None, s, [torch.randn(4, 10), torch.randn(4, 7)])


# -- one store per teacher, read together -------------------------------------------------------


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    data = load_data("digits", seed=0)
    augment = make_augment(data, 0)
    teachers = [build_model(n, num_classes=10, in_channels=1).eval() for n in TEACHERS.split(",")]
    taps = [["features"], ["layer3"]]
    stores = [
        FeatureStore.build(
            str(root / f"t{j}.akds"),
            t,
            data.train,
            taps=tp,
            views=2,
            dtype="fp32",
            augment=augment,
            dataset_id=data.identity,
            progress=False,
        )
        for j, (t, tp) in enumerate(zip(teachers, taps))
    ]
    return data, augment, teachers, taps, stores


def test_teacher_stores_give_each_teacher_its_own_features_of_the_same_images(two_stores):
    data, augment, teachers, _taps, stores = two_stores
    both = TeacherStores(stores)
    sb = both.batches(data.train, augment, batch_size=16, epoch=1, seed=3)
    alone = stores[1].batches(data.train, augment, batch_size=16, epoch=1, seed=3)
    assert (sb.order() == alone.order()).all()
    idx = sb.order()[:16]
    imgs, labels, feats = sb.batch(idx)
    imgs1, labels1, feats1 = alone.batch(idx)
    assert torch.equal(imgs, imgs1) and torch.equal(labels, labels1)
    assert isinstance(feats, list) and len(feats) == 2
    assert set(feats[0]) == {"features", "logits"} and set(feats[1]) == {"layer3", "logits"}
    for k in feats1:
        assert torch.equal(feats[1][k], feats1[k])
    # the stored features are the teachers' own on these very images
    with torch.no_grad():
        torch.testing.assert_close(feats[0]["logits"], teachers[0](imgs), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[1]["logits"], teachers[1](imgs), rtol=1e-4, atol=1e-5)


def test_offline_loss_from_two_stores_equals_the_online_loss(two_stores):
    data, augment, teachers, taps, stores = two_stores
    sb = TeacherStores(stores).batches(data.train, augment, batch_size=16, epoch=0)
    imgs, _labels, feats = sb.batch(sb.order()[:16])
    student = build_model("digits_student", num_classes=10, in_channels=1)
    shapes = [{k: tuple(v.shape[1:]) for k, v in f.items()} for f in feats]
    torch.manual_seed(1)
    offline = Distiller(
        SPEC,
        copy.deepcopy(student),
        ["features"],
        teacher_taps=taps,
        example_input=imgs[:2],
        teacher_shapes=shapes,
    )
    torch.manual_seed(1)
    online = Distiller(
        SPEC,
        copy.deepcopy(student),
        ["features"],
        teacher_taps=taps,
        teacher=teachers,
        example_input=imgs[:2],
    )
    offline.eval(), online.eval()
    a = offline(
        imgs,
        teacher_features=[{k: v for k, v in f.items() if k != "logits"} for f in feats],
        teacher_logits=[f["logits"] for f in feats],
    )
    b = online(imgs)
    assert len(a.mu) == 2  # one feature pair per teacher, weighted by the train-free mu
    torch.testing.assert_close(a.mu, b.mu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.loss_kd, b.loss_kd, rtol=1e-4, atol=1e-6)


def test_teacher_stores_of_other_views_are_refused(two_stores, tmp_path):
    data, augment, teachers, taps, stores = two_stores
    other = FeatureStore.build(
        str(tmp_path / "x.akds"),
        teachers[1],
        data.train,
        taps=taps[1],
        views=1,
        dtype="fp16",
        augment=augment,
        dataset_id=data.identity,
        progress=False,
    )
    with pytest.raises(ValueError, match="teacher 2's store .* has num_views 1, teacher 1's"):
        TeacherStores([stores[0], other])


# -- the CLI end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two"))
    r = CliRunner().invoke(
        main, ["search", "--out", out, "--teacher", TEACHERS, "--budget", "3", *TOY]
    )
    assert r.exit_code == 0, r.output
    return out, r.output


def test_search_with_two_teachers_trains_caches_and_pins_both(searched):
    out, output = searched
    for name in (
        "teacher.pt",
        "teacher-1.pt",
        "teacher_features.akds",
        "teacher_features-1.akds",
        "best.yaml",
        "report.html",
    ):
        assert os.path.exists(os.path.join(out, name)), name
    assert "teacher 1/2 digits_teacher: training" in output
    assert "teacher 2/2 resnet8: training" in output
    assert len(_trials(out)) == 3
    config = _config(out)
    assert config["teachers"] == ["digits_teacher", "resnet8"]
    hashes = config["teacher_hash"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    assert FeatureStore.open(os.path.join(out, "teacher_features-1.akds")).teacher_hash == hashes[1]
    assert f"--teacher {TEACHERS}" in output  # the next command names the teachers


def test_two_teacher_search_resumes_and_refuses_another_teacher_set(searched):
    out, _ = searched
    before = _trials(out)
    r = CliRunner().invoke(
        main, ["search", "--out", out, "--teacher", TEACHERS, "--budget", "4", *TOY]
    )
    assert r.exit_code == 0, r.output
    assert "resuming: 3 finished trials" in r.output
    assert _trials(out)[:3] == before and len(_trials(out)) == 4
    r = CliRunner().invoke(
        main, ["search", "--out", out, "--teacher", "digits_teacher", "--budget", "5", *TOY]
    )
    _one_line_error(r, "the journal belongs to a search with another configuration")
    assert "teachers: journal has ['digits_teacher', 'resnet8'], this run has None" in r.output
    # the same teachers in another order: the run's own teacher files are refused by name
    r = CliRunner().invoke(
        main, ["search", "--out", out, "--teacher", "resnet8,digits_teacher", "--budget", "5", *TOY]
    )
    _one_line_error(r, "teacher 1 of 2 (resnet8): ")
    assert len(_trials(out)) == 4


def test_distill_with_two_teachers_online_and_offline(searched):
    out, _ = searched
    for extra, run in (([], "distill-best-0"), (["--offline", "--views", "2"], "offline")):
        r = CliRunner().invoke(
            main,
            [
                "distill",
                "--out",
                out,
                "--teacher",
                TEACHERS,
                "--spec",
                os.path.join(out, "best.yaml"),
                "--epochs",
                "1",
                "--run-dir",
                os.path.join(out, run),
                "--quiet",
                *extra,
            ],
        )
        assert r.exit_code == 0, r.output
        assert "teacher 2/2 resnet8: loaded" in r.output
        with open(os.path.join(out, run, "result.json")) as f:
            result = json.load(f)
        assert 0.0 <= result["test_accuracy"] <= 1.0
        ck = torch.load(os.path.join(out, run, "checkpoint.pt"), weights_only=True)
        assert ck["pinned"]["teacher_hash"] == _config(out)["teacher_hash"]


def test_cache_verifies_every_teachers_store(searched):
    out, _ = searched
    r = CliRunner().invoke(main, ["cache", "--out", out, "--teacher", TEACHERS, "--verify"])
    assert r.exit_code == 0, r.output
    assert r.output.count(": OK (") == 2 and "teacher_features-1.akds: OK" in r.output


def test_workers_open_every_teacher_and_store_of_the_driver(searched):
    out, _ = searched
    cfg = SearchConfig(teacher=TEACHERS, out=out, views=2, teacher_epochs=1)
    prepared = prepare(cfg, log=lambda _m: None, progress=False)
    setup = TrialSetup.of(cfg, prepared)
    assert setup.teacher_hash == _config(out)["teacher_hash"]
    opened = setup.open("cpu")
    assert [t.hash for t in opened.teachers] == setup.teacher_hash
    assert isinstance(opened.store, TeacherStores) and len(opened.store.stores) == 2


def test_one_teacher_pins_the_keys_it_always_had():
    cfg = SearchConfig()
    # the keys of every search (the space pinned by its content too); several teachers add
    # "teachers"
    assert set(cfg.pinned("data", "sha256:x")) == {
        "data",
        "teacher_hash",
        "student",
        "teacher_taps",
        "student_taps",
        "space",
        "space_fingerprint",
        "strategy",
        "seed",
        "views",
        "proxy",
    }
    assert cfg.pinned("data", "sha256:x")["teacher_hash"] == "sha256:x"


def test_train_teacher_trains_each_teacher_to_the_files_a_search_finds(tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "train-teacher",
            "--out",
            str(tmp_path),
            "--teacher",
            "digits_student,digits_student",
            "--teacher-epochs",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("teacher saved to") == 2
    assert os.path.exists(tmp_path / "teacher.pt") and os.path.exists(tmp_path / "teacher-1.pt")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--teacher", TEACHERS, "--teacher-checkpoint", "a.pt"],
            (
                "expected one --teacher-checkpoint per --teacher "
                "(2 teachers: digits_teacher, resnet8), got 1 ('a.pt')"
            ),
        ),
        (
            ["--teacher", TEACHERS, "--teacher-taps", "features;layer3;layer2"],
            "expected one --teacher-taps list per teacher",
        ),
        (
            ["--teacher", "digits_teacher,resnet21"],
            "teacher 2 of 2: unknown model 'resnet21'; did you mean",
        ),
        (
            ["--teacher", TEACHERS, "--teacher-taps", "features;layer9"],
            "teacher 2 of 2 (resnet8): 'layer9' names no module of CifarResNet",
        ),
        (
            ["--teacher", TEACHERS, "--teacher-taps", "features;layer2,layer3"],
            "teacher 2 of 2 (resnet8): expected as many student taps as teacher taps",
        ),
        (
            ["--teacher", TEACHERS, "--teacher-checkpoint", "/nonexistent/a.pt,"],
            "teacher 1 of 2 (digits_teacher): checkpoint /nonexistent/a.pt does not exist",
        ),
    ],
)
@pytest.mark.parametrize("command", ["search", "distill"])
def test_bad_teacher_lists_get_one_line_before_any_training(tmp_path, command, args, message):
    extra = ["--spec", "kd", "--teacher-epochs", "1", "--quiet"] if command == "distill" else TOY
    r = CliRunner().invoke(main, [command, "--out", str(tmp_path), *args, *extra])
    _one_line_error(r, message)
    assert not os.path.exists(tmp_path / "teacher.pt")  # nothing was trained
