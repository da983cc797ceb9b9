"""A corpus of malformed and suspicious inputs (YAML specs and spaces, npz arrays, image
folders, models, training settings): each gives one line naming the problem, never a
traceback, and nothing suspicious is accepted in silence."""

import os

import numpy as np
import pytest
from faultlib import cli, one_line_error
from PIL import Image

from autokd.data import load_data
from autokd.space import load_space, space_fingerprint
from autokd.space.spec import CONFIG_DIR

SEED = 14

SPEC_CORPUS = {
    "unclosed_list.yaml": ("feature_distance: [l2\nlogit_distance: kl\n", "not valid YAML at line"),
    "bad_indent.yaml": ("feature_distance: l2\n  logit_distance: kl\n", "not valid YAML at line 2"),
    "python_tag.yaml": (
        "feature_distance: !!python/object/apply:os.system ['echo pwned']\n",
        "not valid YAML",
    ),
    "custom_tag.yaml": ("feature_distance: !l2 {}\n", "not valid YAML"),
    "empty.yaml": ("", "empty"),
    "comments_only.yaml": ("# nothing here\n", "empty"),
    "a_list.yaml": ("- feature_distance: l2\n", "expected a mapping"),
    "unknown_field.yaml": ("feature_distanse: l2\n", "unknown field"),
}

SPACE_CORPUS = {
    "unclosed.yaml": ("levels: [{name: feature_distance, options: [l2, kl]\n", "not valid YAML"),
    "python_tag.yaml": ("levels: !!python/name:os.system\n", "not valid YAML"),
    "requires_scalar.yaml": (
        (
            "levels:\n  - {name: logit_distance, options: [kl, pearson]}\n"
            "  - {name: temperature, options: [1, 4], requires: logit_distance}\n"
        ),
        "expected 'requires' to be a mapping",
    ),
    "options_scalar.yaml": (
        "levels:\n  - {name: feature_distance, options: l2}\n",
        "expected 'options' to be a list",
    ),
    "levels_scalar.yaml": ("levels: feature_distance\n", "expected 'levels' to be a list"),
    "empty.yaml": ("", "empty"),
}


@pytest.mark.parametrize("name", sorted(SPEC_CORPUS))
def test_malformed_spec_files(tmp_path, name, faults):
    text, words = SPEC_CORPUS[name]
    f = tmp_path / name
    f.write_text(text)
    faults.injected("malformed spec file")
    r = cli("distill", "--spec", f, "--out", tmp_path)
    one_line_error(r, str(f), words)
    faults.survived("malformed spec file")


@pytest.mark.parametrize("name", sorted(SPACE_CORPUS))
def test_malformed_space_files(tmp_path, name, faults):
    text, words = SPACE_CORPUS[name]
    f = tmp_path / name
    f.write_text(text)
    faults.injected("malformed space file")
    r = cli("search", "--space", f, "--out", tmp_path / "out")
    one_line_error(r, words)
    faults.survived("malformed space file")


def _npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def _images(rng, n, shape, scale=1.0):
    return (rng.random((n, *shape)) * scale).astype(np.float32)


def _npz_corpus(tmp_path):
    rng = np.random.default_rng(SEED)
    y = np.repeat(np.arange(4), 10)
    hw = (8, 8, 1)
    cases = {
        "not_a_zip": (
            lambda p: p.write_bytes(b"PK\x03\x04 this is not a zip" * 10),
            "cannot read it",
        ),
        "missing_y_test": (
            lambda p: np.savez(
                p, x_train=_images(rng, 40, hw), y_train=y, x_test=_images(rng, 8, hw)
            ),
            "missing y_test",
        ),
        "scales_255_vs_1": (
            lambda p: _npz(p, _images(rng, 40, hw, 255.0), y, _images(rng, 8, hw, 1.0), y[:8]),
            "expected both on one scale",
        ),
        "stray_label": (
            lambda p: _npz(
                p,
                _images(rng, 40, hw),
                np.concatenate([y[:-1], [100000]]),
                _images(rng, 8, hw),
                y[:8],
            ),
            "the largest label is 100000",
        ),
        "ambiguous_layout": (
            lambda p: _npz(p, _images(rng, 40, (3, 3, 3)), y, _images(rng, 8, (3, 3, 3)), y[:8]),
            "is ambiguous",
        ),
        "bad_layout_value": (
            lambda p: _npz(p, _images(rng, 40, hw), y, _images(rng, 8, hw), y[:8], layout="CHWN"),
            "expected the array 'layout'",
        ),
        "float_labels": (
            lambda p: _npz(
                p, _images(rng, 40, hw), y.astype(np.float32), _images(rng, 8, hw), y[:8]
            ),
            "integer class labels",
        ),
    }
    out = {}
    for name, (make, words) in cases.items():
        p = tmp_path / f"{name}.npz"
        make(p)
        out[name] = (p, words)
    return out


def test_malformed_and_suspicious_npz(tmp_path, faults):
    for path, words in _npz_corpus(tmp_path).values():
        faults.injected("malformed or suspicious npz")
        r = cli("train-teacher", "--data", f"npz:{path}", "--out", tmp_path / "out")
        one_line_error(r, str(path), words)
        faults.survived("malformed or suspicious npz")
    assert not (tmp_path / "out" / "teacher.pt").exists()


def test_npz_layout_rule(tmp_path):
    """The documented rule: a square image decides NCHW/NHWC when both axes could be channels;
    an array 'layout' in the file says it outright."""
    rng = np.random.default_rng(SEED)
    y = np.repeat(np.arange(2), 10)
    nchw = _npz(
        tmp_path / "nchw.npz", _images(rng, 20, (3, 4, 4)), y, _images(rng, 4, (3, 4, 4)), y[:4]
    )
    nhwc = _npz(
        tmp_path / "nhwc.npz", _images(rng, 20, (4, 4, 3)), y, _images(rng, 4, (4, 4, 3)), y[:4]
    )
    said = _npz(
        tmp_path / "said.npz",
        _images(rng, 20, (3, 3, 3)),
        y,
        _images(rng, 4, (3, 3, 3)),
        y[:4],
        layout="NHWC",
    )
    assert load_data(f"npz:{nchw}").train.images.shape[1:] == (3, 4, 4)
    assert load_data(f"npz:{nhwc}").train.images.shape[1:] == (3, 4, 4)
    assert load_data(f"npz:{said}").train.images.shape[1:] == (3, 3, 3)


def _folder(root, sizes=(8, 8), per_class=6):
    rng = np.random.default_rng(SEED)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((rng.random(sizes) * 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


def test_folder_with_a_bad_first_image(tmp_path, faults):
    corrupt = _folder(tmp_path / "corrupt")
    first = corrupt / "train" / "a" / "00.png"
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    loop = _folder(tmp_path / "loop")
    target = loop / "train" / "a" / "00.png"
    target.unlink()
    os.symlink(target, target)  # points at itself
    for root, path, words in (
        (corrupt, first, "cannot read image"),
        (loop, target, "Too many levels of symbolic links"),
    ):
        faults.injected("folder data: unreadable first image")
        r = cli("train-teacher", "--data", f"folder:{root}", "--out", tmp_path / "out")
        one_line_error(r, str(path), words)
        faults.survived("folder data: unreadable first image")


def test_images_too_small_for_the_model(tmp_path, faults):
    root = _folder(tmp_path / "tiny", sizes=(1, 1), per_class=10)
    faults.injected("images too small for the model")
    r = cli(
        "train-teacher",
        "--data",
        f"folder:{root}",
        "--teacher",
        "digits_teacher",
        "--out",
        tmp_path / "out",
    )
    one_line_error(r, "digits_teacher", "1x1x1")
    assert not (tmp_path / "out" / "teacher.pt").exists()
    faults.survived("images too small for the model")


def test_diverged_distill_is_one_line(tmp_path, digits_teacher, faults):
    faults.injected("distill diverges")
    r = cli(
        "distill",
        "--spec",
        "kd",
        "--teacher-checkpoint",
        digits_teacher,
        "--lr",
        "1e12",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        tmp_path,
    )
    one_line_error(r, "diverged", "Lower --lr")
    faults.survived("distill diverges")


def test_space_fingerprint_pins_content_not_the_file(tmp_path):
    """The search pins space_fingerprint: a space file edited between two runs of a search
    changes it; a comment or another name does not."""
    base = load_space("autokd")
    original = (CONFIG_DIR / "spaces" / "autokd.yaml").read_text()
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text("# a comment\n" + original.replace("name: autokd", "name: renamed"))
    assert space_fingerprint(load_space(str(renamed))) == space_fingerprint(base)
    edited = tmp_path / "edited.yaml"
    edited.write_text(original.replace("[1, 5, 25, 50]", "[1, 5, 25]"))
    assert len(list(load_space(str(edited)).designs())) < len(list(base.designs()))
    assert space_fingerprint(load_space(str(edited))) != space_fingerprint(base)
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(original.replace("adapter: auto", "adapter: always"))
    assert space_fingerprint(load_space(str(fixed))) != space_fingerprint(base)
