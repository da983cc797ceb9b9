"""Cost of checking the feature store's data on the read path: per open and per batch.

A reader checks every data chunk against its XXH64 checksum once per process, either the first
time a gather touches it (verify="touch") or all of them when the store is opened
(verify="open"); verify="none" (no check, what the store did before) is the reference, measured
in the same run on the same bytes. Figures, medians of --repeats fresh opens:
- open: FeatureStore.open(...) alone;
- first epoch: open + one epoch of gathers (batches of 128 in a random order, view 0 only, as
  epoch 0 of training reads) - touch pays its checks here;
- proxy epoch: open + one epoch over a 20% random subset of the samples (a search trial's read);
- steady batch: a gather of 128 random records once every chunk has been checked.
Stores: "digits" is the real digits teacher's store (layer taps + logits, fp16, 4 views of the
training split; the teacher's weights are random: the cost depends on the bytes, not their
values); "synthetic" has --samples records x --views views of one [64, 8, 8] fp16 tap plus
[10] fp16 logits (8,256-byte records), filled with random bytes. Warm page cache (the store is
written just before, on --dir).

    python benchmarks/bench_store_verify.py [--samples 50000 --views 4 --dir /dev/shm]
    pytest benchmarks/bench_store_verify.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autokd import _engine  # noqa: E402
from autokd.store import FeatureStore  # noqa: E402

BATCH = 128
MODES = ("none", "touch", "open")


def write_synthetic_store(path, samples, views, seed=0):
    fields = [("layer3", "fp16", [64, 8, 8]), ("logits", "fp16", [10])]
    writer = _engine.StoreWriter(path, fields, samples, views, "bench", "bench", "bench")
    rng = np.random.default_rng(seed)
    step = 4096
    for _ in range(views):
        for s in range(0, samples, step):
            m = min(step, samples - s)
            writer.append(
                [rng.integers(-(2**15), 2**15, size=(m, *f[2]), dtype=np.int16) for f in fields], m
            )
    writer.finish()
    return path


def write_digits_store(path, views=4):
    from autokd.data import load_data
    from autokd.models import build_model, default_taps
    from autokd.pipeline import make_augment

    data = load_data("digits", val_fraction=0.1, seed=0)
    torch.manual_seed(0)
    teacher = build_model("digits_teacher", num_classes=10, in_channels=1)
    FeatureStore.build(
        path,
        teacher,
        data.train,
        taps=default_taps("digits_teacher"),
        views=views,
        augment=make_augment(data, 0),
        dataset_id=data.identity,
        progress=False,
    )
    return path


class Reads:
    """Timed reads of one store file in each verify mode."""

    def __init__(self, path, threads=1, subset=0.2, seed=1):
        self.path, self.threads = path, threads
        probe = FeatureStore.open(path, verify="none", num_threads=threads)
        self.n, self.views = probe.num_samples, probe.num_views
        self.file_bytes = probe._get_reader().file_bytes
        self.num_chunks = probe.num_chunks
        rng = np.random.default_rng(seed)
        self.order = rng.permutation(self.n)
        self.subset = np.sort(rng.choice(self.n, max(1, int(self.n * subset)), replace=False))
        self.subset = self.subset[rng.permutation(self.subset.size)]
        self.random = [
            (rng.integers(0, self.n, BATCH), rng.integers(0, self.views, BATCH)) for _ in range(64)
        ]
        probe.verify()  # warm the page cache before anything is timed

    def open(self, mode):
        return FeatureStore.open(self.path, verify=mode, num_threads=self.threads)

    def epoch(self, store, order):
        out = store.empty_batch(BATCH)
        for b in range(0, order.size, BATCH):
            idx = order[b : b + BATCH]
            store.gather(idx, 0, out=out)

    def time_open(self, mode, repeats):
        return _median(lambda: self.open(mode), repeats)

    def time_epoch(self, mode, order, repeats):
        return _median(lambda: self.epoch(self.open(mode), order), repeats)

    def time_steady_batch(self, mode, repeats=200):
        store = self.open(mode)
        store.verify()  # every chunk checked: what every batch after the first epoch pays
        out = store.empty_batch(BATCH)
        it = iter(range(10**9))

        def one():
            idx, v = self.random[next(it) % len(self.random)]
            store.gather(idx, v, out=out)

        return _median(one, repeats, warmup=5)


def _median(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(path, repeats, threads):
    r = Reads(path, threads)
    res = {
        "file_bytes": r.file_bytes,
        "samples": r.n,
        "views": r.views,
        "chunks": r.num_chunks,
        "epoch_batches": -(-r.n // BATCH),
        "proxy_batches": -(-r.subset.size // BATCH),
    }
    for mode in MODES:
        res[f"open_{mode}"] = r.time_open(mode, repeats)
        res[f"epoch_{mode}"] = r.time_epoch(mode, r.order, repeats)
        res[f"proxy_{mode}"] = r.time_epoch(mode, r.subset, repeats)
        res[f"batch_{mode}"] = r.time_steady_batch(mode)
    return res


def report(name, res, command):
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    lines = [
        f"Store: {name}, {res['samples']} samples x {res['views']} views, "
        f"{res['file_bytes'] / 1e6:.1f} MB, {res['chunks']} chunks of 1 MiB.",
        f"Command: `{command}`",
        "",
        "| verify | open | open + first epoch (view 0) | open + proxy epoch (20% subset) | "
        "steady batch of 128 |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        lines.append(
            f"| {mode} | {ms(res[f'open_{mode}'])} | {ms(res[f'epoch_{mode}'])} | "
            f"{ms(res[f'proxy_{mode}'])} | {res[f'batch_{mode}'] * 1e6:.1f} us |"
        )
    for mode in ("touch", "open"):
        extra = res[f"epoch_{mode}"] - res["epoch_none"]
        extra_p = res[f"proxy_{mode}"] - res["proxy_none"]
        lines.append(
            f"\n{mode}: {ms(res[f'open_{mode}'] - res['open_none'])} more per open; over the "
            f"first epoch {ms(extra)} more ({extra / res['epoch_batches'] * 1e3:.3f} ms per batch "
            f"of {res['epoch_batches']}), over a proxy epoch {ms(extra_p)} more "
            f"({extra_p / res['proxy_batches'] * 1e3:.3f} ms per batch of {res['proxy_batches']}); "
            f"steady batch {res[f'batch_{mode}'] / res['batch_none']:.2f} x unchecked."
        )
    return "\n".join(lines)


# --- pytest-benchmark ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("verify") / "s.akd")
    return Reads(write_synthetic_store(path, 2048, 2))


@pytest.mark.parametrize("mode", MODES)
def test_open(benchmark, reads, mode):
    benchmark(reads.open, mode)


@pytest.mark.parametrize("mode", MODES)
def test_open_and_first_epoch(benchmark, reads, mode):
    benchmark(lambda: reads.epoch(reads.open(mode), reads.order))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the temporary stores go")
    p.add_argument("--skip-digits", action="store_true")
    args = p.parse_args()
    command = "python benchmarks/bench_store_verify.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        if not args.skip_digits:
            path = write_digits_store(os.path.join(d, "digits.akd"))
            print(
                report(
                    "digits (real teacher taps + logits, fp16)",
                    measure(path, args.repeats, args.threads),
                    command,
                )
            )
            os.remove(path)
            print()
        path = write_synthetic_store(os.path.join(d, "synthetic.akd"), args.samples, args.views)
        print(
            report(
                "synthetic [64, 8, 8] + [10] fp16",
                measure(path, args.repeats, args.threads),
                command,
            )
        )


if __name__ == "__main__":
    main()
