import pickle

import numpy as np
import pytest
import torch

from autokd.store import (
    FeatureStore,
    OfflineDistillDataset,
    ReplayAugment,
    StoreError,
    load_batch,
    teacher_hash,
)
from conftest import TinyTeacher, all_records

TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def expected_outputs(teacher, dataset, aug, idx, views, taps, batch=None):
    """Teacher outputs for the replayed augmented images, computed as the build does (batched)."""
    captured = {}
    mods = dict(teacher.named_modules())
    hooks = [
        mods[t].register_forward_hook(lambda m, i, o, t=t: captured.__setitem__(t, o)) for t in taps
    ]
    teacher.eval()
    with torch.no_grad():
        imgs, _ = load_batch(dataset, idx)
        logits = teacher(aug.apply_batch(imgs, idx, views))
    for h in hooks:
        h.remove()
    return {**{t: captured[t] for t in taps}, "logits": logits}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_round_trip_every_dtype(tmp_path, teacher, dataset, dtype):
    aug = ReplayAugment(seed=3)
    store = FeatureStore.build(
        tmp_path / "s.akd",
        teacher,
        dataset,
        taps=["layer1", "stem.2"],
        views=3,
        dtype=dtype,
        batch_size=5,
        augment=aug,
        progress=False,
    )
    assert store.num_samples == len(dataset) and store.num_views == 3
    assert store.schema == [
        ("layer1", dtype, [16, 4, 4]),
        ("stem.2", dtype, [8, 8, 8]),
        ("logits", dtype, [10]),
    ]
    assert store.teacher_hash == teacher_hash(teacher) and store.augment_id == aug.identity()
    assert store.dataset_id.startswith("content:")
    store.verify()
    for v in range(3):  # the build batches samples of one view together: same batches here
        for s in range(0, len(dataset), 5):
            idx = np.arange(s, min(len(dataset), s + 5))
            want = expected_outputs(teacher, dataset, aug, idx, v, ["layer1", "stem.2"])
            got = store.gather(idx, v)
            for name, t in want.items():
                assert got[name].dtype == TORCH[dtype]
                assert torch.equal(got[name], t.to(TORCH[dtype])), (name, v, s)


def test_alignment_stored_features_equal_teacher_on_replayed_image(tmp_path, teacher, dataset):
    """For random (sample, view): the stored fp32 features are bitwise the teacher's output on
    the image the student gets for that view, replayed from (seed, i, v) alone.

    Float reductions inside conv/linear kernels depend on the batch a sample is computed in, so
    "the teacher run on the replayed image" is run on the build's batch of that view (samples
    batch_size * floor(i / batch_size) onwards), each image replayed one by one with apply();
    a lone forward of the single image agrees to rounding, and another view's image does not."""
    aug = ReplayAugment(seed=11, crop_padding=2)
    bs = 8
    store = FeatureStore.build(
        tmp_path / "a.akd",
        teacher,
        dataset,
        taps=["layer2"],
        views=4,
        dtype="fp32",
        batch_size=bs,
        augment=aug,
        progress=False,
    )
    ds = OfflineDistillDataset(store, dataset, aug)
    assert teacher.training  # build restores the mode it found
    teacher.eval()
    mods = dict(teacher.named_modules())
    captured = {}
    mods["layer2"].register_forward_hook(lambda m, i, o: captured.__setitem__("layer2", o))
    rng = np.random.default_rng(0)
    for i, v in zip(rng.integers(0, len(dataset), 12), rng.integers(0, 4, 12)):
        i, v = int(i), int(v)
        ds.set_epoch(v + 4 * int(rng.integers(0, 3)))  # epoch e -> view e % K
        img, label, feats = ds[i]
        assert label == dataset.labels[i]
        assert torch.equal(img, aug.apply(dataset[i][0], aug.params(i, v)))
        first = i // bs * bs
        batch = torch.stack(
            [
                aug.apply(dataset[j][0], aug.params(j, v))
                for j in range(first, min(len(dataset), first + bs))
            ]
        )
        with torch.no_grad():
            logits = teacher(batch)
        assert torch.equal(feats["layer2"], captured["layer2"][i - first])
        assert torch.equal(feats["logits"], logits[i - first])
        with torch.no_grad():
            alone = teacher(img[None])
        torch.testing.assert_close(feats["layer2"], captured["layer2"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats["logits"], alone[0], rtol=1e-5, atol=1e-6)
        other = aug.params(i, (v + 1) % 4)
        if other != aug.params(i, v):
            with torch.no_grad():
                wrong = teacher(aug.apply(dataset[i][0], other)[None])
            assert (wrong[0] - feats["logits"]).abs().max() > 1e-3


def test_gather_outputs_and_argument_checks(tmp_path, teacher, tensor_dataset):
    store = FeatureStore.build(
        tmp_path / "g.akd",
        teacher,
        tensor_dataset,
        taps=["layer1"],
        views=2,
        dtype="bf16",
        dataset_id="tiny:train:1",
        progress=False,
    )
    idx, views, ref = all_records(store)
    out = store.empty_batch(64)
    got = store.gather(torch.from_numpy(idx), torch.from_numpy(views), out=out)
    assert got["layer1"].data_ptr() == out["layer1"].data_ptr()
    for name in ref:
        assert torch.equal(got[name], ref[name])
    one = store.gather([4, 4, 0], 1)
    assert torch.equal(
        one["logits"], ref["logits"][[len(tensor_dataset) + 4] * 2 + [len(tensor_dataset)]]
    )
    with pytest.raises(ValueError, match=r"indices\[1\] in \[0, 23\), got 23"):
        store.gather([0, 23], 0)
    with pytest.raises(ValueError, match=r"views\[0\] in \[0, 2\), got 2"):
        store.gather([0], 2)
    with pytest.raises(ValueError, match="one per index"):
        store.gather([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="out\\['layer1'\\]"):
        store.gather([0], 0, out={"layer1": torch.empty(1, 16, 4, 4), "logits": torch.empty(1, 10)})
    with pytest.raises(ValueError, match="integer"):
        store.gather(np.array([0.5]), 0)


def test_open_checks_expectations(tmp_path, teacher, dataset):
    path = tmp_path / "e.akd"
    FeatureStore.build(
        path, teacher, dataset, taps=["layer1"], dataset_id="tiny:train:1", progress=False
    )
    schema = [("layer1", "fp16", [16, 4, 4]), ("logits", "fp16", [10])]
    s = FeatureStore.open(
        path,
        expect_teacher_hash=teacher_hash(teacher),
        expect_dataset_id="tiny:train:1",
        expect_schema=schema,
    )
    assert s.schema == schema
    other = teacher_hash(TinyTeacher())
    with pytest.raises(StoreError, match="teacher hash") as e:
        FeatureStore.open(path, expect_teacher_hash=other)
    assert e.value.path == str(path) and e.value.check == "teacher hash"
    assert e.value.expected.strip("'") == other and e.value.found.strip("'") == s.teacher_hash
    with pytest.raises(
        StoreError, match="data set id: expected 'cifar10:train', found 'tiny:train:1'"
    ):
        FeatureStore.open(path, expect_dataset_id="cifar10:train")
    with pytest.raises(
        StoreError, match=r"schema: expected layer1:fp32\[16,4,4\] logits:fp16\[10\], found"
    ):
        FeatureStore.open(
            path, expect_schema=[("layer1", "fp32", [16, 4, 4]), ("logits", "fp16", [10])]
        )
    assert isinstance(e.value, ValueError)


def test_teacher_hash_is_stable_and_sensitive():
    a, b = TinyTeacher(), TinyTeacher()
    b.load_state_dict(a.state_dict())
    assert teacher_hash(a) == teacher_hash(b)
    with torch.no_grad():
        b.fc.bias[3] += 1e-6
    assert teacher_hash(a) != teacher_hash(b)
    b.load_state_dict(a.state_dict())
    b.stem[1].num_batches_tracked += 1  # buffers count too
    assert teacher_hash(a) != teacher_hash(b)


def test_build_argument_errors(tmp_path, teacher, dataset):
    with pytest.raises(
        ValueError,
        match=r"teacher: 'layer_1' names no module of \w+; did you mean "
        r"'layer1'",
    ):
        FeatureStore.build(tmp_path / "x.akd", teacher, dataset, taps=["layer_1"], progress=False)
    with pytest.raises(ValueError, match="reserved"):
        FeatureStore.build(tmp_path / "x.akd", teacher, dataset, taps=["logits"], progress=False)
    with pytest.raises(ValueError, match="dtype fp16, bf16 or fp32, got 'fp64'"):
        FeatureStore.build(tmp_path / "x.akd", teacher, dataset, dtype="fp64", progress=False)
    assert not list(tmp_path.iterdir())


def test_batches_one_gather_per_batch(tmp_path, teacher, dataset):
    aug = ReplayAugment(seed=2)
    store = FeatureStore.build(
        tmp_path / "b.akd", teacher, dataset, taps=["layer2"], views=3, dtype="fp32", progress=False
    )  # default augment: none
    with pytest.raises(ValueError, match="augmentation: expected"):
        store.batches(dataset, aug)
    store = FeatureStore.build(
        tmp_path / "b.akd",
        teacher,
        dataset,
        taps=["layer2"],
        views=3,
        dtype="fp32",
        augment=aug,
        progress=False,
    )
    subset = np.array([1, 3, 5, 7, 9, 11, 13, 2, 4])
    loader = store.batches(dataset, aug, batch_size=4, indices=subset, epoch=5, seed=1)
    assert len(loader) == 3 and loader.view == 2
    seen = []
    for imgs, labels, feats in loader:
        seen.append((imgs, labels, feats))
    order = np.concatenate([np.asarray(b) for b in _batch_indices(loader)])
    assert sorted(order.tolist()) == sorted(subset.tolist())
    for (imgs, labels, feats), idx in zip(seen, _batch_indices(loader)):
        assert torch.equal(imgs, aug.apply_batch(dataset.images[idx], idx, 2))
        assert torch.equal(labels, dataset.labels[idx])
        ref = store.gather(idx, 2)
        assert all(torch.equal(feats[k], ref[k]) for k in ref)
    again = [
        b[1] for b in store.batches(dataset, aug, batch_size=4, indices=subset, epoch=5, seed=1)
    ]
    assert all(torch.equal(a, b[1]) for a, b in zip(again, seen))
    other = [
        b[1] for b in store.batches(dataset, aug, batch_size=4, indices=subset, epoch=6, seed=1)
    ]
    assert any(not torch.equal(a, b[1]) for a, b in zip(other, seen))
    assert len(store.batches(dataset, aug, batch_size=4, indices=subset, drop_last=True)) == 2
    unshuffled = next(iter(store.batches(dataset, aug, batch_size=4, shuffle=False)))
    assert torch.equal(unshuffled[1], dataset.labels[:4])


def _batch_indices(loader):
    order = loader.indices
    if loader.shuffle:
        order = order[np.random.default_rng([loader.seed, loader.epoch]).permutation(order.size)]
    return [order[b * loader.batch_size : (b + 1) * loader.batch_size] for b in range(len(loader))]


def test_progress_bar_on_build(tmp_path, teacher, dataset, capsys):
    FeatureStore.build(tmp_path / "p.akd", teacher, dataset, views=2, batch_size=10, progress=True)
    err = capsys.readouterr().err
    assert "store p.akd" in err and "46/46" in err and "rec" in err


def test_pickles_by_path(tmp_path, teacher, dataset):
    store = FeatureStore.build(
        tmp_path / "k.akd", teacher, dataset, taps=["layer1"], progress=False
    )
    clone = pickle.loads(pickle.dumps(store))
    assert clone._reader is None
    a, b = store.gather([3, 1], 0), clone.gather([3, 1], 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
