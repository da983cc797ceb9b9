"""A design without a teacher term (``--spec none``, the student alone) runs no teacher forward
and reads no teacher record from the feature store: it costs what a student-alone loop costs."""

import math

import pytest
import torch

from autokd.data import load_data
from autokd.pipeline import load_or_train_teacher, make_augment, open_or_build_store, resolve_taps
from autokd.store import FeatureStore
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig, _epoch_source, stratified_subset

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_free")
    data = load_data("digits", val_fraction=0.1, seed=0)
    teacher = load_or_train_teacher(
        data,
        "digits_teacher",
        None,
        str(root / "teacher.pt"),
        epochs=1,
        log=lambda m: None,
        progress=False,
    )
    aug = make_augment(data, 0)
    store = open_or_build_store(
        str(root / "store.akds"),
        teacher,
        data,
        aug,
        views=2,
        dtype="fp16",
        log=lambda m: None,
        progress=False,
    )
    return data, teacher, aug, store


class _Counts:
    def __init__(self, teacher, monkeypatch):
        self.forwards = self.gathers = 0
        self._hook = teacher.model.register_forward_hook(self._forward)
        real = FeatureStore.gather

        def gather(store, *a, **k):
            self.gathers += 1
            return real(store, *a, **k)

        monkeypatch.setattr(FeatureStore, "gather", gather)

    def _forward(self, *_):
        self.forwards += 1

    def close(self):
        self._hook.remove()


@pytest.mark.parametrize("offline", [False, True])
def test_spec_none_runs_no_teacher_and_reads_no_store(setup, tmp_path, monkeypatch, offline):
    data, teacher, aug, store = setup
    # subset 0.2 of the 1,295 training images at batch 64: 5 steps per epoch, 2 epochs
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, subset=0.2, offline=offline, seed=0)
    steps = 2 * math.ceil(len(data.train) * 0.2 / 64)
    taps = resolve_taps("digits_student", None)
    counts = {}
    for spec in ("none", "kd"):
        c = _Counts(teacher, monkeypatch)
        try:
            res = run_distill(
                resolve_spec(spec),
                data,
                teacher,
                "digits_student",
                taps,
                cfg,
                str(tmp_path / spec),
                store=store if offline else None,
                augment=aug,
                log=lambda m: None,
                progress=False,
            )
        finally:
            c.close()
        assert math.isfinite(res.test_ce)
        counts[spec] = (c.forwards, c.gathers)
    assert counts["none"] == (0, 0)
    # the positive control: KD runs the teacher once per step online (plus the one forward
    # that learns its feature shapes), or reads one store batch per step offline (and runs
    # that one forward)
    assert counts["kd"] == ((1, steps) if offline else (steps + 1, 0))


def test_spec_none_offline_trains_on_the_stored_views(setup, tmp_path):
    # The student alone with --offline sees the very images an offline KD run sees (view
    # epoch mod K of the store's augmentation), read from memory instead of the store.
    data, _, aug, store = setup
    cfg = TrainConfig(epochs=2, batch_size=64, subset=0.2, offline=True, seed=0)
    idx = stratified_subset(data.train.labels, cfg.subset, cfg.seed)
    for epoch in (0, 1, 2):
        order_a, with_features = _epoch_source(data, cfg, idx, epoch, store, aug)
        order_b, without = _epoch_source(data, cfg, idx, epoch, store, aug, features=False)
        assert torch.equal(order_a, order_b)
        sb = store.batches(
            data.train, aug, batch_size=64, indices=idx.numpy(), epoch=epoch, seed=cfg.seed
        )
        x_ref, y_ref, feats = sb.batch(order_a[:64].numpy())
        x, y, tf, tl = with_features(order_a[:64])
        x2, y2, tf2, tl2 = without(order_a[:64])
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert torch.equal(x2, x_ref) and torch.equal(y2, y_ref) and tf2 is None and tl2 is None
        assert torch.equal(tl, feats["logits"])
        assert all(torch.equal(tf[k], feats[k]) for k in tf)
