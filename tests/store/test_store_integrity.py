"""Corruption, fuzzing, concurrent readers and interrupted builds."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autokd import _engine
from autokd.store import FeatureStore, OfflineDistillDataset, ReplayAugment, StoreError
from conftest import all_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def u64(b, off):
    return int.from_bytes(b[off : off + 8], "little")


def put_u64(b, off, v):
    b[off : off + 8] = int(v).to_bytes(8, "little")


def reseal(b):
    """Recompute the header checksum so the checks behind it are reached."""
    h = u64(b, 16)
    if 8 <= h <= len(b):
        put_u64(b, h - 8, _engine.xxh64(bytes(b[: h - 8])))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """(path, bytes) of a valid store; bytes wrapped so failure reports stay short."""
    from conftest import ListDataset, TinyTeacher

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "good.akd"
    FeatureStore.build(
        path,
        TinyTeacher(),
        ListDataset(),
        taps=["layer1"],
        views=2,
        dtype="fp16",
        progress=False,
        chunk_bytes=4096,
    )
    return path, _Bytes(path.read_bytes())


class _Bytes(bytes):
    def __repr__(self):
        return f"<{len(self)} bytes>"


def opened(tmp_path, data, verify=False):
    p = tmp_path / "bad.akd"
    p.write_bytes(bytes(data))
    s = FeatureStore.open(p)
    if verify:
        s.verify()
    return s


def error_of(tmp_path, data, verify=False):
    with pytest.raises(StoreError) as e:
        opened(tmp_path, data, verify)
    assert e.value.path == str(tmp_path / "bad.akd") and isinstance(e.value, ValueError)
    return e.value


def test_good_file_opens_and_verifies(tmp_path, good_file):
    s = opened(tmp_path, good_file[1], verify=True)
    assert s.num_samples == 23 and s.num_views == 2


@pytest.mark.parametrize("keep", [-1, -4096, 300, 20, 0])
def test_truncated(tmp_path, good_file, keep):
    data = good_file[1]
    e = error_of(tmp_path, data[: keep if keep > 0 else len(data) + keep] if keep else b"")
    assert e.check == "truncated file"
    if keep < 0:
        assert e.expected == f"{len(data)} bytes" and e.found == f"{len(data) + keep} bytes"


def test_flipped_header_byte(tmp_path, good_file):
    data = bytearray(good_file[1])
    h = u64(data, 16)
    for pos in range(40, h, 13):
        b = bytearray(data)
        b[pos] ^= 0x04
        e = error_of(tmp_path, b)
        assert e.check == "header checksum", pos
        assert e.expected != e.found


def test_flipped_data_byte_fails_verify_naming_the_chunk(tmp_path, good_file):
    data = bytearray(good_file[1])
    d = u64(data, 24)
    pos = d + 3 * 4096 + 17
    data[pos] ^= 0x01
    s = opened(tmp_path, data)  # data are not read at open
    with pytest.raises(StoreError, match=r"data checksum of chunk 3 \(file bytes \[") as e:
        s.verify()
    assert e.value.expected != e.value.found


def test_unknown_version_and_magic(tmp_path, good_file):
    b = bytearray(good_file[1])
    b[8] = 7
    e = error_of(tmp_path, b)
    assert (e.check, e.expected, e.found) == ("format version", "1", "7")
    b = bytearray(good_file[1])
    b[0:8] = b"PK\x03\x04abcd"
    assert error_of(tmp_path, b).check == "magic"


@pytest.mark.parametrize(
    "field,value,check",
    [
        (24, 1 << 40, "data region inside the file"),  # data offset far past the end
        (24, 4096 * 1000, "data region inside the file"),
        (40, 10**6, "data region inside the file"),  # more samples than the file holds
        (48, 3, "data region inside the file"),  # more views
        (16, 1 << 50, "header length inside the file"),  # header length past the end
        (56, 64, "record layout"),  # record stride disagrees with the schema
        (72, 1, "chunk table"),
    ],
)
def test_offsets_outside_the_file(tmp_path, good_file, field, value, check):
    b = bytearray(good_file[1])
    put_u64(b, field, value)
    reseal(b)
    assert error_of(tmp_path, b).check == check


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        FeatureStore.open(tmp_path / "missing.akd")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_random_and_mutated_headers(tmp_path, good_file, data):
    """Any header: StoreError (from open, or from verify when only a chunk checksum changed) or a
    store whose every record is readable; never a crash or another exception type."""
    src = bytearray(good_file[1])
    h = u64(src, 16)
    kind = data.draw(
        st.sampled_from(["noise", "mutate", "mutate+reseal", "mutate+reseal+truncate"])
    )
    if kind == "noise":
        b = bytearray(data.draw(st.binary(min_size=0, max_size=5000)))
        if data.draw(st.booleans()) and len(b) >= 16:
            b[0:12] = b"AUTOKDFS\x01\x00\x00\x00"
    else:
        b = bytearray(src)
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(8, h - 9))
            if data.draw(st.booleans()):
                put_u64(
                    b, pos, data.draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, h, len(b), 4096]))
                )
            else:
                b[pos] = data.draw(st.integers(0, 255))
        if "reseal" in kind:
            reseal(b)
        if "truncate" in kind:
            b = b[: data.draw(st.integers(0, len(b)))]
    try:
        s = opened(tmp_path, b, verify=True)
    except StoreError:
        return
    all_records(s)
    assert all(isinstance(x, str) for x in (s.teacher_hash, s.dataset_id, s.augment_id))


def test_concurrent_reader_threads(tmp_path, good_file):
    s = opened(tmp_path, good_file[1])
    ref = all_records(s)[2]
    n, k = s.num_samples, s.num_views

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            idx, v = rng.integers(0, n, 64), rng.integers(0, k, 64)
            got = s.gather(idx, v)
            if not all(torch.equal(got[f], ref[f][v * n + idx]) for f in ref):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def _child_gather(store, seed, queue):
    rng = np.random.default_rng(seed)
    idx, v = rng.integers(0, store.num_samples, 50), rng.integers(0, store.num_views, 50)
    got = store.gather(idx, v)
    queue.put((seed, idx, v, {f: t.float().numpy() for f, t in got.items()}))


def test_concurrent_reader_forked_processes(tmp_path, good_file, dataset):
    s = opened(tmp_path, good_file[1])
    ref = all_records(s)[2]
    s.gather([0], 0)  # mapped and used in the parent before forking
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_gather, args=(s, seed, q)) for seed in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    n = s.num_samples
    for _, idx, v, got in results:
        for f in ref:
            np.testing.assert_array_equal(got[f], ref[f][v * n + idx].float().numpy())


def test_dataloader_workers_read_the_right_records(tmp_path, teacher, dataset):
    aug = ReplayAugment(seed=4)
    store = FeatureStore.build(
        tmp_path / "w.akd", teacher, dataset, taps=["layer2"], views=2, augment=aug, progress=False
    )
    ds = OfflineDistillDataset(store, dataset, aug, indices=np.arange(0, 23, 2))
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    got = list(loader)
    idx = np.arange(0, 23, 2)
    ref = store.gather(idx, 1)
    assert torch.equal(torch.cat([b[2]["layer2"] for b in got]), ref["layer2"])
    assert torch.equal(torch.cat([b[0] for b in got]), aug.apply_batch(dataset.images[idx], idx, 1))


BUILD_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import ListDataset, TinyTeacher
    from autokd.store import FeatureStore

    path, seed, samples, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

    class Slow(TinyTeacher):
        def forward(self, x):
            print("batch", flush=True)
            time.sleep(pause)
            return super().forward(x)

    torch.manual_seed(seed)
    FeatureStore.build(path, Slow(), ListDataset(n=samples), taps=["layer1"], views=2, batch_size=8,
                       progress=False, dataset_id="slow")
    print("done", flush=True)
""")


def _run_build(path, seed, kill_after_batches=None):
    script = BUILD_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=ROOT)
    # A killed build runs slowly over many samples so that the kill lands mid-build.
    args = ["400", "0.05"] if kill_after_batches else ["40", "0"]
    p = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(seed), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if kill_after_batches is None:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.endswith("done\n")
        return
    seen = 0
    for line in p.stdout:
        seen += line == "batch\n"
        if seen >= kill_after_batches:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_build_leaves_no_complete_file_and_rebuild_restarts(tmp_path):
    path = tmp_path / "killed.akd"
    _run_build(path, seed=0, kill_after_batches=20)
    partial = tmp_path / "killed.akd.partial"
    assert not path.exists() and partial.exists() and partial.stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="partial exists: a build was interrupted"):
        FeatureStore.open(path)
    with pytest.raises(StoreError, match="magic"):  # the partial file itself never opens
        FeatureStore.open(partial)
    _run_build(path, seed=0)  # builds again from scratch over the stale .partial
    assert not partial.exists()
    first = FeatureStore.open(path, expect_dataset_id="slow")
    first.verify()
    old = path.read_bytes()
    # Killing a rebuild (new weights) keeps the previous complete store intact.
    _run_build(path, seed=1, kill_after_batches=20)
    assert partial.exists() and path.read_bytes() == old
    FeatureStore.open(path, expect_teacher_hash=first.teacher_hash).verify()
