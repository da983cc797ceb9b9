import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from autokd.cli import main
from autokd.data import DATASETS, apply_augmentation, augment, load_data, sample_augmentation
from autokd.data.formats import stratified_split
from autokd.pipeline import default_models, default_proxy, default_training


def _denorm(bundle, x):
    mean = torch.tensor(bundle.mean)[:, None, None]
    std = torch.tensor(bundle.std)[:, None, None]
    return x * std + mean


# ----------------------------------------------------------------------------------- digits


def test_digits_splits():
    d = load_data("digits")
    assert (d.name, d.num_classes, d.channels, d.image_size) == ("digits", 10, 1, (8, 8))
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert 355 <= len(d.test) <= 365 and abs(len(d.val) - 0.1 * (1797 - len(d.test))) < 10
    # val is carved from the training split: disjoint from train, every class present.
    assert not set(d.train.indices.tolist()) & set(d.val.indices.tolist())
    assert len(set(d.train.indices.tolist()) | set(d.val.indices.tolist())) == 1797 - len(d.test)
    assert torch.bincount(d.val.labels, minlength=10).min() > 0
    x, y = d.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert d.allow_flip is False
    # normalised with statistics of the training split
    full = torch.cat([d.train.images, d.val.images])
    assert abs(float(full.mean())) < 1e-4 and abs(float(full.std()) - 1) < 1e-3


def test_digits_seed_moves_val_but_never_test():
    a, b, a2 = load_data("digits", seed=0), load_data("digits", seed=1), load_data("digits", seed=0)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.val.indices, b.val.indices)
    assert torch.equal(a.val.indices, a2.val.indices)
    assert a.identity == a2.identity != b.identity
    assert "digits" in a.identity and "sha256=" in a.identity


def test_val_fraction_zero_and_bad_values():
    d = load_data("digits", val_fraction=0.0)
    assert len(d.val) == 0 and len(d.train) == 1797 - len(d.test)
    with pytest.raises(ValueError, match="val_fraction"):
        load_data("digits", val_fraction=1.0)


def test_unknown_specs():
    with pytest.raises(KeyError, match="cifar10"):
        load_data("cifar11:/tmp")
    with pytest.raises(ValueError, match="PATH"):
        load_data("cifar10")
    with pytest.raises(ValueError, match="no path"):
        load_data("digits:/tmp")


# ------------------------------------------------------------------------------------ CIFAR


def _write_batch(path, data, labels, label_key):
    # The real files are protocol-2 pickles of dicts with bytes keys.
    batch = {
        b"batch_label": b"fabricated",
        b"data": data,
        label_key.encode(): list(labels),
        b"filenames": [b"x.png"] * len(labels),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _cifar10(root, rng, per_batch=6, bad_label=False):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    arrays = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        if bad_label and name == "test_batch":
            labels[0] = 10
        _write_batch(d / name, data, labels, "labels")
        arrays.append((data, labels))
    return d, arrays


def test_cifar10_reads_the_python_format(tmp_path):
    rng = np.random.default_rng(0)
    folder, arrays = _cifar10(tmp_path, rng)
    identities = set()
    for path in (tmp_path, folder):  # the folder itself or its parent
        d = load_data(f"cifar10:{path}", val_fraction=0.0)
        assert (d.num_classes, d.channels, d.image_size, d.allow_flip) == (10, 3, (32, 32), True)
        assert len(d.train) == 30 and len(d.test) == 6
        identities.add(d.identity)
    assert len(identities) == 1  # the identity names the content, not where it was read from
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    data, labels = arrays[0]
    img = _denorm(d, d.train.images[0])
    expected = torch.from_numpy(data[0].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(img, expected, atol=1e-5)
    assert d.train.labels[0] == labels[0]
    test_data, test_labels = arrays[-1]
    assert torch.allclose(
        _denorm(d, d.test.images[3]),
        torch.from_numpy(test_data[3].reshape(3, 32, 32) / 255).float(),
        atol=1e-5,
    )
    assert torch.equal(d.test.labels, torch.from_numpy(test_labels))


def test_cifar10_errors(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'nowhere'}")
    folder, _ = _cifar10(tmp_path / "a", rng, bad_label=True)
    with pytest.raises(ValueError, match="label 10 out of range"):
        load_data(f"cifar10:{folder}")
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_data(f"cifar10:{folder}")


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, _ = _cifar10(tmp_path, np.random.default_rng(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        load_data(f"cifar10:{folder}")
    assert not (tmp_path / "pwned").exists()


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train = rng.integers(0, 256, (40, 3072), dtype=np.uint8)
    train_labels = np.arange(40) % 100 + 60  # labels up to 99
    _write_batch(d / "train", train, train_labels, "fine_labels")
    _write_batch(d / "test", train[:5], train_labels[:5], "fine_labels")
    bundle = load_data(f"cifar100:{tmp_path}", val_fraction=0.0)
    assert bundle.num_classes == 100 and len(bundle.train) == 40
    assert bundle.train.labels.max() == 99
    with open(d / "test", "wb") as f:
        pickle.dump({b"data": train[:5], b"coarse_labels": [0] * 5}, f, protocol=2)
    with pytest.raises(ValueError, match="fine_labels"):
        load_data(f"cifar100:{tmp_path}")


# ----------------------------------------------------------------------------------- folder


def _image_folder(root, mode="RGB", size=(12, 10), classes=("cat", "dog"), per_class=4):
    rng = np.random.default_rng(4)
    pixels = {}
    for split, n in (("train", per_class), ("val", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a, mode).save(root / split / c / f"{i}.png")
                pixels[(split, c, i)] = a
    return pixels


def test_folder_reads_class_folders(tmp_path):
    pixels = _image_folder(tmp_path)  # PIL sizes are (W, H) = (12, 10)
    d = load_data(f"folder:{tmp_path}", val_fraction=0.0)
    assert (d.num_classes, d.channels, d.image_size, d.classes) == (2, 3, (10, 12), ["cat", "dog"])
    assert len(d.train) == 8 and len(d.test) == 4
    first = _denorm(d, d.train.images[0])  # train/cat/0.png
    expected = torch.from_numpy(pixels[("train", "cat", 0)].transpose(2, 0, 1) / 255).float()
    assert torch.allclose(first, expected, atol=1e-5)
    assert d.train.labels.tolist() == [0] * 4 + [1] * 4
    resized = load_data(f"folder:{tmp_path}", val_fraction=0.0, image_size=6)
    assert resized.image_size == (6, 6) and resized.train.images.shape[1:] == (3, 6, 6)


def test_folder_grayscale(tmp_path):
    _image_folder(tmp_path, mode="L", classes=("a", "b", "c"))
    d = load_data(f"folder:{tmp_path}", val_fraction=0.25)
    assert d.channels == 1 and d.num_classes == 3 and len(d.val) == 3


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val/<class>"):
        load_data(f"folder:{tmp_path}")
    (tmp_path / "val" / "cow").mkdir(parents=True)
    with pytest.raises(ValueError, match="cow"):
        load_data(f"folder:{tmp_path}")


# -------------------------------------------------------------------------------------- npz


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_nhwc_uint8_equals_nchw_float(tmp_path):
    rng = np.random.default_rng(5)
    x_train = rng.integers(0, 256, (20, 9, 11, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (6, 9, 11, 3), dtype=np.uint8)
    y_train, y_test = np.arange(20) % 4, np.arange(6) % 4
    a = load_data(
        _npz(tmp_path / "a.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test),
        val_fraction=0.0,
    )
    b = load_data(
        _npz(
            tmp_path / "b.npz",
            x_train=x_train.transpose(0, 3, 1, 2) / 255.0,
            y_train=y_train,
            x_test=x_test.transpose(0, 3, 1, 2) / 255.0,
            y_test=y_test,
        ),
        val_fraction=0.0,
    )
    assert (a.channels, a.image_size, a.num_classes) == (3, (9, 11), 4)
    assert torch.allclose(a.train.images, b.train.images, atol=1e-5)
    assert torch.allclose(a.test.images, b.test.images, atol=1e-5)
    assert a.identity != b.identity


def test_npz_single_channel_without_axis(tmp_path):
    rng = np.random.default_rng(6)
    spec = _npz(
        tmp_path / "g.npz",
        x_train=rng.random((12, 8, 8), dtype=np.float32),
        y_train=np.arange(12) % 3,
        x_test=rng.random((3, 8, 8), dtype=np.float32),
        y_test=np.arange(3),
    )
    d = load_data(spec, val_fraction=0.25)
    assert d.channels == 1 and d.num_classes == 3 and len(d.val) == 3 and len(d.train) == 9


def test_npz_errors(tmp_path):
    x = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    y = np.array([0, 1, 0, 1])
    with pytest.raises(FileNotFoundError):
        load_data(f"npz:{tmp_path / 'none.npz'}")
    with pytest.raises(KeyError, match="y_test"):
        load_data(_npz(tmp_path / "m.npz", x_train=x, y_train=y, x_test=x))
    with pytest.raises(ValueError, match="label 2 out of range"):
        load_data(_npz(tmp_path / "l.npz", x_train=x, y_train=y, x_test=x, y_test=y + 1))
    with pytest.raises(ValueError, match="differ in shape"):
        load_data(
            _npz(
                tmp_path / "s.npz",
                x_train=x,
                y_train=y,
                x_test=np.zeros((4, 6, 6, 1), np.uint8),
                y_test=y,
            )
        )
    with pytest.raises(ValueError, match=r"expected y_train of shape \[4\]"):
        load_data(_npz(tmp_path / "n.npz", x_train=x, y_train=y[:3], x_test=x, y_test=y))
    with pytest.raises(ValueError, match="channel axis"):
        load_data(
            _npz(
                tmp_path / "c.npz",
                x_train=np.zeros((4, 8, 8, 8)),
                y_train=y,
                x_test=np.zeros((4, 8, 8, 8)),
                y_test=y,
            )
        )


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_a_shifted_and_flipped_crop():
    x = torch.randn(5, 3, 8, 6)
    centre = torch.full((5, 2), 1)
    none = torch.zeros(5, dtype=torch.bool)
    assert torch.equal(apply_augmentation(x, centre, none, 1), x)
    assert torch.equal(apply_augmentation(x, centre, ~none, 1), x.flip(-1))
    down_right = apply_augmentation(x, torch.zeros(5, 2, dtype=torch.long), none, 1)
    assert torch.equal(down_right[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert (down_right[:, :, 0] == 0).all() and (down_right[:, :, :, 0] == 0).all()


def test_augmentation_replays_from_its_parameters():
    x = torch.randn(16, 1, 8, 8)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = augment(x, 1, True, g1)
    offsets, flips = sample_augmentation(16, 1, True, g2)
    assert torch.equal(a, apply_augmentation(x, offsets, flips, 1))
    _, no_flips = sample_augmentation(16, 1, False)
    assert not no_flips.any()


# --------------------------------------------------------------------------- stratification


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    fraction=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_properties(labels, fraction, seed):
    y = np.array(labels)
    keep, held = stratified_split(y, fraction, seed)
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(y)))
    assert (np.diff(keep) > 0).all() and (np.diff(held) > 0).all()
    for c in np.unique(y):
        n_c, h_c = int((y == c).sum()), int((y[held] == c).sum())
        assert h_c <= n_c - 1  # every class keeps a training sample
        assert h_c == min(int(round(n_c * fraction)), n_c - 1)
    again = stratified_split(y, fraction, seed)
    assert np.array_equal(again[1], held)


# ---------------------------------------------------------------------- registry defaults


def test_each_data_kind_carries_the_defaults_of_a_run_on_it():
    # What a run uses when the user names no models and no schedule.
    assert default_models("digits") == ("digits_teacher", "digits_student")
    # digits: the student has a fixed 20% of the training split and a proxy of its own
    assert default_training("digits") == {
        "epochs": 60,
        "batch_size": 32,
        "lr": 0.1,
        "data_fraction": 0.2,
    }
    assert default_proxy("digits") == {"subset": 1.0, "stop_fraction": 0.1, "sparsity": 0.0}
    # a ViT from scratch learns nothing in 10% of the digits epochs: a third of them per trial
    for vit in ("vit_compact", "vit_tiny?depth=2", "timm:vit_tiny_patch16_224"):
        assert default_proxy("digits", vit) == {
            "subset": 1.0,
            "stop_fraction": 0.33,
            "sparsity": 0.0,
        }
    assert default_proxy("digits", "digits_student") == default_proxy("digits")
    assert default_proxy("cifar10:/data", "vit_compact") == default_proxy("cifar10:/data")
    for spec in ("cifar10:/data", "cifar100:/data", "folder:/data", "npz:/data/x.npz"):
        assert default_models(spec) == ("resnet56", "resnet20")
        assert default_training(spec) == {
            "epochs": 240,
            "batch_size": 64,
            "lr": 0.05,
            "data_fraction": 1.0,
        }
        assert default_proxy(spec) == {"subset": 0.2, "stop_fraction": 0.2, "sparsity": 0.5}
        kind = DATASETS.get(spec.split(":")[0])
        assert (kind.teacher, kind.student) == default_models(spec)
    with pytest.raises(KeyError, match="unknown data set 'digit'; did you mean 'digits'"):
        default_training("digit")


def test_cli_help_states_the_defaults_the_commands_apply():
    out = CliRunner().invoke(main, ["search", "--help"], terminal_width=1000).output
    text = " ".join(out.split())
    assert "[default: resnet56 on cifar10, cifar100, folder, npz; digits_teacher on digits]" in text
    assert "[default: resnet20 on cifar10, cifar100, folder, npz; digits_student on digits]" in text
    assert "[default: 240 on cifar10, cifar100, folder, npz; 60 on digits]" in text
    assert "[default: 64 on cifar10, cifar100, folder, npz; 32 on digits]" in text
    assert "[default: 0.05 on cifar10, cifar100, folder, npz; 0.1 on digits]" in text
