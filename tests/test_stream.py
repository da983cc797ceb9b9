"""Streamed image folders (``folder:PATH?stream=1``, autokd.data.stream): a DataLoader with worker
processes decodes random-resized crops; the feature store and the training read the same view
of every sample bit for bit; class subsets; a corrupt image is named; the in-memory reader
refuses a folder that would not fit.

The folder is generated (helpers.make_image_folder): 5 classes, 64 training and 8 validation
images each, JPEG and PNG of sizes 20..40 pixels, each class a colour and a stripe direction so
that a model can learn it; in one copy a file of the training split is corrupt.
"""

import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from autokd.cli import main
from autokd.data import formats, load_data, stream
from autokd.distill import Distiller
from autokd.models import build_model
from autokd.pipeline import make_augment
from autokd.store import FeatureStore, ReplayResizedCrop
from autokd.train.loop import TrainConfig, _epoch_batches, stratified_subset, train_student
from helpers import FOLDER_CLASSES, FOLDER_PER_CLASS, FOLDER_PER_CLASS_VAL, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread_module")

CLASSES, PER_CLASS, PER_CLASS_VAL = FOLDER_CLASSES, FOLDER_PER_CLASS, FOLDER_PER_CLASS_VAL


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(root)
    return str(root)


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    bad = make_image_folder(root, corrupt=(3, 37))  # 3 * 64 + 37: training file 229 of 320
    return str(root), bad


def _spec(path, **options):
    return f"folder:{path}?" + "&".join(f"{k}={v}" for k, v in {"stream": 1, **options}.items())


def test_streamed_folder_loads_lazily_with_the_folder_layout(folder, monkeypatch):
    decoded = []
    real = stream.StreamedSplit.decode
    monkeypatch.setattr(
        stream.StreamedSplit,
        "decode",
        lambda self, i, *a, **k: decoded.append(i) or real(self, i, *a, **k),
    )
    data = load_data(_spec(folder, size=16, workers=0), val_fraction=0.1, seed=0)
    # only the 256 images of the normalisation statistics were decoded, one at a time
    assert len(decoded) == stream.STATS_SAMPLES
    assert (data.num_classes, data.channels, data.image_size) == (5, 3, (16, 16))
    assert len(data.train) + len(data.val) == 5 * PER_CLASS and len(data.test) == 5 * PER_CLASS_VAL
    assert data.classes == CLASSES and data.train.streaming
    assert data.identity.startswith("folder+stream|val=0.1|seed=0|size=16x16|mode=RGB|")
    assert data.train.images.shape == (len(data.train), 3, 16, 16)
    x = data.train.images[:3]  # eval transform: resize to 18, centre crop 16, normalised
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[1], data.train[1][0])
    # normalised with the sampled statistics: the held-out images are near mean 0, std 1
    v = data.val.images[:]
    assert v.mean().abs() < 0.3 and 0.6 < v.std() < 1.4


def test_options_are_checked(folder):
    with pytest.raises(ValueError, match="unknown option 'strem'; expected one of stream, size"):
        load_data(f"folder:{folder}?strem=1")
    with pytest.raises(ValueError, match="expected classes an integer >= 2, got '1'"):
        load_data(f"folder:{folder}?stream=1&classes=1")
    with pytest.raises(ValueError, match="expected classes <= the 5 class folders, got classes=9"):
        load_data(f"folder:{folder}?stream=1&classes=9")


def test_class_subset_is_seeded_recorded_and_independent_of_the_split_seed(folder):
    a = load_data(_spec(folder, size=16, classes=3, workers=0), seed=0)
    b = load_data(_spec(folder, size=16, classes=3, workers=0), seed=1)
    c = load_data(_spec(folder, size=16, classes=3, class_seed=1, workers=0), seed=0)
    assert a.num_classes == 3 and a.classes == b.classes
    assert a.classes == sorted(a.classes) and set(a.classes) <= set(CLASSES)
    assert a.classes != c.classes  # class_seed 1 draws another subset (measured)
    assert "classes=3/seed0" in a.identity and "classes=3/seed1" in c.identity
    assert int(a.train.labels.max()) == 2 and len(a.test) == 3 * PER_CLASS_VAL
    # the same subset in memory
    m = load_data(f"folder:{folder}?classes=3&size=16", seed=0)
    assert m.classes == a.classes and "classes=3/seed0" in m.identity
    assert not getattr(m.train, "streaming", False) and m.train.images.shape[1:] == (3, 16, 16)


def test_replay_resized_crop_is_a_pure_function_of_seed_sample_view_and_size():
    aug = ReplayResizedCrop(seed=5, size=16)
    p = aug.params(7, 2, 30, 40)
    assert p == aug.params(7, 2, 30, 40) == ReplayResizedCrop(seed=5, size=16).params(7, 2, 30, 40)
    boxes = {aug.params(i, v, 30, 40) for i in range(20) for v in range(3)}
    assert len(boxes) > 50  # views and samples differ
    for b in boxes:  # every box lies in the image, with an aspect in [3/4, 4/3] or the fallback
        assert 0 <= b.top and b.top + b.height <= 30 and 0 <= b.left and b.left + b.width <= 40
    flips = [aug.params(i, 0, 30, 40).flip for i in range(200)]
    assert 60 < sum(flips) < 140
    assert not any(
        ReplayResizedCrop(seed=5, size=16, flip=False).params(i, 0, 30, 40).flip for i in range(50)
    )
    assert aug.identity() != ReplayResizedCrop(seed=6, size=16).identity()


def test_store_and_training_read_the_same_views_bit_for_bit(folder, tmp_path):
    data = load_data(_spec(folder, size=16, workers=2), val_fraction=0.1, seed=0)
    aug = make_augment(data, 0)
    assert isinstance(aug, ReplayResizedCrop) and aug.size == 16
    torch.manual_seed(0)
    teacher = build_model("resnet8", num_classes=5, in_channels=3).eval()
    seen = {}  # (view, sample) -> the image the teacher got while the store was built
    state = {"view": 0, "next": 0}

    def record(_module, args):
        x = args[0]
        n = len(data.train)
        for r in range(x.shape[0]):
            seen[(state["view"], state["next"])] = x[r].clone()
            state["next"] += 1
            if state["next"] == n:
                state["view"], state["next"] = state["view"] + 1, 0

    hook = teacher.register_forward_pre_hook(record)
    store = FeatureStore.build(
        str(tmp_path / "s.akds"),
        teacher,
        data.train,
        taps=["layer3"],
        views=2,
        dtype="fp32",
        batch_size=64,
        augment=aug,
        dataset_id=data.identity,
        progress=False,
    )
    hook.remove()
    assert len(seen) == 2 * len(data.train)
    cfg = TrainConfig(epochs=3, batch_size=32, subset=0.5, offline=True, seed=1)
    idx = stratified_subset(data.train.labels, cfg.subset, cfg.seed)
    loader = data.train.loader(aug)
    checked = 0
    for epoch in (0, 1, 2):
        order = store.batches(
            data.train, aug, batch_size=32, indices=idx.numpy(), epoch=epoch, seed=cfg.seed
        ).order()
        batches = [order[i : i + 32] for i in range(0, len(order), 32)]
        for ids, (x, y, tf, tl) in zip(
            batches, _epoch_batches(data, cfg, idx, epoch, store, aug, stream=loader)
        ):
            want = torch.stack([seen[(epoch % 2, int(i))] for i in ids])
            assert torch.equal(x, want), f"epoch {epoch}: images differ from the stored views"
            assert torch.equal(y, data.train.labels[torch.from_numpy(ids)])
            stored = store.gather(ids, epoch % 2)
            assert torch.equal(tl, stored["logits"]) and torch.equal(tf["layer3"], stored["layer3"])
            checked += len(ids)
    loader.close()
    assert checked == 3 * len(idx)
    # StoreBatches (the store's own reader) decodes the same views
    sb = store.batches(data.train, aug, batch_size=8, indices=idx.numpy(), epoch=1, seed=1)
    ids = sb.order()[:8]
    assert torch.equal(sb.batch(ids)[0], torch.stack([seen[(1, int(i))] for i in ids]))


def test_training_streams_through_worker_processes(folder, monkeypatch):
    # a teacher-free design and KD with an online teacher, on DataLoader workers; the
    # loader's worker processes really start (num_workers 2)
    data = load_data(_spec(folder, size=16, workers=2), val_fraction=0.1, seed=0)
    made = []
    real = torch.utils.data.DataLoader.__init__

    def spy(self, *a, **k):
        made.append(k.get("num_workers"))
        real(self, *a, **k)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=5, in_channels=3)
    teacher = build_model("resnet8", num_classes=5, in_channels=3).eval()
    d = Distiller("kd", student, teacher=teacher, example_input=data.train.images[:2])
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, offline=False, seed=0)
    res = train_student(d, student, data, cfg, augment=make_augment(data, 0))
    assert made == [2] and res.steps == 3 * math.ceil(len(data.train) / 32)
    assert all(math.isfinite(h["loss"]) for h in res.history)


def test_a_corrupt_image_is_named(corrupt_folder):
    root, bad = corrupt_folder
    # not among the 256 files of the statistics (seed 0 draws them), so loading succeeds and
    # the file is met by the batch that reads it
    picked = set(
        np.random.default_rng(stream.STATS_SEED).choice(5 * PER_CLASS, 256, replace=False).tolist()
    )
    assert 3 * PER_CLASS + 37 not in picked
    data = load_data(_spec(root, size=16, workers=2), val_fraction=0.1, seed=0)
    position = data.train.files.index(bad)
    loader = data.train.loader(make_augment(data, 0))
    with pytest.raises(ValueError, match=f"folder: cannot read image '{bad}'"):
        list(loader.batches([torch.arange(position - 3, position + 3)], 0))
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=5, in_channels=3)
    cfg = TrainConfig(epochs=1, batch_size=64, offline=False)
    with pytest.raises(ValueError, match=f"folder: cannot read image '{bad}'"):
        train_student(Distiller("none", student), student, data, cfg, augment=make_augment(data, 0))
    with pytest.raises(ValueError, match=f"folder: cannot read image '{bad}'"):
        data.train.images[position - 1 : position + 1]
    # the in-memory reader names it too
    with pytest.raises(ValueError, match=f"folder: cannot read image '{bad}'"):
        load_data(f"folder:{root}?size=16")


def test_in_memory_folder_too_large_is_refused_with_the_way_to_stream(folder, monkeypatch):
    monkeypatch.setattr(formats, "memory_limit_bytes", lambda: 1 << 20)
    with pytest.raises(
        ValueError,
        match=r"more than 0\.0 GiB .* stream them instead: --data "
        rf"'folder:{folder}\?stream=1'",
    ):
        load_data(f"folder:{folder}")
    assert load_data(_spec(folder, size=16, workers=0)).train.streaming  # streaming still works


def test_cli_distill_on_a_streamed_folder_with_a_corrupt_image(corrupt_folder, folder, tmp_path):
    """train-teacher, cache, search and distill on a streamed folder, end to end; the corrupt
    file is named in one line."""
    root, bad = corrupt_folder
    common = ["--teacher", "resnet8", "--student", "resnet8", "--teacher-epochs", "1"]
    spec = _spec(folder, size=16, workers=2)
    out = str(tmp_path / "ok")
    r = CliRunner().invoke(
        main,
        [
            "distill",
            "--data",
            spec,
            "--spec",
            "kd",
            "--epochs",
            "1",
            "--out",
            out,
            "--quiet",
            "--offline",
            "--views",
            "2",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    r = CliRunner().invoke(
        main,
        [
            "search",
            "--data",
            spec,
            "--budget",
            "2",
            "--epochs",
            "5",
            "--out",
            out,
            "--quiet",
            "--views",
            "2",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "2 trials" in r.output
    r = CliRunner().invoke(
        main,
        [
            "distill",
            "--data",
            _spec(root, size=16, workers=2),
            "--spec",
            "none",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "bad"),
            "--quiet",
            *common,
        ],
    )
    assert r.exit_code == 1
    assert f"cannot read image '{bad}'" in r.output and "Traceback" not in r.output
    assert os.path.exists(bad)


def test_search_with_local_worker_processes_streams_in_each(folder, tmp_path):
    """Two local trial workers, each with its own DataLoader worker process: a trial worker
    is not daemonic, so it may start them (a daemonic one may not)."""
    spec = _spec(folder, size=16, workers=1)
    r = CliRunner().invoke(
        main,
        [
            "search",
            "--data",
            spec,
            "--budget",
            "2",
            "--epochs",
            "5",
            "--out",
            str(tmp_path),
            "--quiet",
            "--views",
            "2",
            "--workers",
            "2",
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--teacher-epochs",
            "1",
            "--select-fidelity",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "2 trials (2 new)" in r.output
