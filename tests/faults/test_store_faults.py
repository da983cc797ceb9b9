"""Feature store: flipped bits and truncations never reach a student; `cache --verify` reports;
`cache` rebuilds a damaged store but never one of another teacher."""

import random
import re

import numpy as np
import pytest
import torch
from faultlib import cli, one_line_error

from autokd.store import FeatureStore, StoreError

SEED = 14
DAMAGE = ("header checksum", "truncated file", "file size")


@pytest.fixture(scope="module")
def store_file(tmp_path_factory):
    """A store with many small chunks (4 KiB), so random flips land in different chunks."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    data = torch.utils.data.TensorDataset(torch.randn(96, 3, 8, 8), torch.randint(0, 10, (96,)))
    path = tmp_path_factory.mktemp("store") / "good.akds"
    s = FeatureStore.build(
        path, teacher, data, taps=["0"], views=2, progress=False, chunk_bytes=4096
    )
    reader = s._get_reader()
    return path, path.read_bytes(), reader.data_offset, s


def _write(tmp_path, data: bytes, name="bad.akds"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _read_everything(store, batch=16):
    """Gather every record in batches; returns the batches that came back, then the error."""
    n, k = store.num_samples, store.num_views
    got = []
    for v in range(k):
        for s in range(0, n, batch):
            idx = np.arange(s, min(n, s + batch))
            try:
                got.append((v, idx, store.gather(idx, v)))
            except StoreError as e:
                return got, e
    return got, None


def test_bit_flips_in_the_data_never_reach_a_reader(tmp_path, store_file, faults):
    _, good, data_offset, good_store = store_file
    rng = random.Random(SEED)
    for _ in range(24):
        pos = rng.randrange(data_offset, len(good))
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        faults.injected("store: bit flip in the data region")
        s = FeatureStore.open(_write(tmp_path, bytes(bad)))
        got, err = _read_everything(s)
        # every batch that came back holds exactly the stored bytes
        for v, idx, feats in got:
            want = good_store.gather(idx, v)
            assert all(torch.equal(feats[k], want[k]) for k in want), (
                f"damaged bytes returned (flip at {pos})"
            )
        assert err is not None, f"flip at byte {pos} was never reported"
        chunk = (pos - data_offset) // 4096
        msg = str(err)
        a = data_offset + chunk * 4096
        assert f"data checksum of chunk {chunk} (file bytes [{a}, " in msg, msg
        assert re.search(r"expected 0x[0-9a-f]{16}, found 0x[0-9a-f]{16}", msg), msg
        assert "autokd-cli cache" in msg and str(tmp_path / "bad.akds") in msg
        faults.survived("store: bit flip in the data region")


def test_bit_flips_in_the_header_and_truncations_refuse_to_open(tmp_path, store_file, faults):
    _, good, _, _ = store_file
    header_bytes = int.from_bytes(good[16:24], "little")
    rng = random.Random(SEED + 1)
    for _ in range(24):
        pos = rng.randrange(0, header_bytes)
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        faults.injected("store: bit flip in the header")
        with pytest.raises(StoreError) as e:
            FeatureStore.open(_write(tmp_path, bytes(bad)))
        assert str(tmp_path / "bad.akds") in str(e.value)
        if e.value.check in DAMAGE:  # not "magic" or "format version": another file, not damage
            assert "rebuild it with `autokd-cli cache`" in str(e.value), str(e.value)
        faults.survived("store: bit flip in the header")
    for _ in range(12):
        keep = rng.randrange(0, len(good))
        faults.injected("store: truncated file")
        with pytest.raises(StoreError) as e:
            FeatureStore.open(_write(tmp_path, good[:keep]))
        assert e.value.check in ("truncated file", "magic"), str(e.value)  # magic: cut before it
        if e.value.check == "truncated file":
            assert "rebuild it with `autokd-cli cache`" in str(e.value), str(e.value)
        faults.survived("store: truncated file")


def test_cache_verify_reports_ok_or_the_damage(tmp_path, store_file, faults):
    path, good, _, _ = store_file
    r = cli("cache", "--verify", "--store", path)
    assert r.exit_code == 0 and "OK" in r.output, r.output
    bad = bytearray(good)
    bad[len(good) - 5] ^= 0x10  # the last chunk
    faults.injected("store: cache --verify on a damaged file")
    r = cli("cache", "--verify", "--store", _write(tmp_path, bytes(bad)))
    line = one_line_error(r, "data checksum of chunk", "autokd-cli cache")
    assert r.exit_code == 1, line
    faults.survived("store: cache --verify on a damaged file")
    r = cli("cache", "--verify", "--store", tmp_path / "missing.akds")
    one_line_error(r, "missing.akds")


def test_offline_distill_and_cache_with_a_damaged_store(tmp_path, digits_teacher, faults):
    """distill --offline refuses the damaged chunk by name; `cache` rebuilds the damaged store."""
    out = tmp_path / "run"
    common = ["--out", out, "--teacher-checkpoint", digits_teacher, "--views", "1"]
    r = cli("cache", *common)
    assert r.exit_code == 0, r.output
    store = out / "teacher_features.akds"
    good = store.read_bytes()
    bad = bytearray(good)
    data_offset = int.from_bytes(good[24:32], "little")
    bad[data_offset + 100] ^= 0x04
    store.write_bytes(bytes(bad))
    faults.injected("store: damaged chunk under distill --offline")
    r = cli("distill", *common, "--spec", "kd", "--offline", "--epochs", "1", "--quiet")
    one_line_error(r, "data checksum of chunk 0", str(store))
    assert not (out / "distill-kd-0" / "student.pt").exists()
    faults.survived("store: damaged chunk under distill --offline")

    faults.injected("store: cache over a damaged store")
    r = cli("cache", *common)
    assert r.exit_code == 0 and "damaged" in r.output and "rebuilding" in r.output, r.output
    assert store.read_bytes() == good  # the same teacher, data and views: the same bytes
    faults.survived("store: cache over a damaged store")
