"""Feature store gather throughput vs a plain copy, numpy memmap fancy indexing and the teacher.

One batch = 128 random records (random samples, random views) of a store with the taps of a
CIFAR ResNet-56 teacher (layer1 [16,32,32], layer2 [32,16,16], layer3 [64,8,8], logits [100];
fp16), read from a warm page cache. References, measured in the same run on the same bytes:
- copy: a plain memcpy (numpy copyto) of as many bytes, contiguous, from the same mapped file
  at a random record (same page cache, same memory), target: gather >= 70% of its bandwidth;
  a copy between two hot buffers (benchmarks.common.copy_seconds; they fit in the last-level
  cache at this size) is reported beside it;
- memmap: numpy memmap of the data region, fancy indexing of the 128 records, target: slower;
- online: the ResNet-56 teacher's forward pass on the batch's 128 images, with forward hooks on
  the same taps (what offline features replace), target: >= 10x slower.
The store's bytes are random: gather speed does not depend on the values, and building a
many-hundred-MB store with a real teacher would dominate the run on a small CPU.

    python benchmarks/bench_store.py [--samples 4096 --views 2 --device cpu|cuda]  # markdown table
    pytest benchmarks/bench_store.py --benchmark-only  # pytest-benchmark
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run as a script from a checkout
from autokd import _engine  # noqa: E402
from autokd.store import FeatureStore  # noqa: E402
from common import copy_seconds, median_seconds  # noqa: E402

BATCH = 128
TAPS = {"layer1": [16, 32, 32], "layer2": [32, 16, 16], "layer3": [64, 8, 8], "logits": [100]}


def resnet56(num_classes=100):
    """The zoo's CIFAR ResNet-56: layer1-3 give the TAPS shapes on 32x32 inputs."""
    from autokd.models import build_model

    return build_model("resnet56", num_classes=num_classes, in_channels=3)


def write_random_store(path, samples, views, seed=0, threads=4):
    fields = [(name, "fp16", shape) for name, shape in TAPS.items()]
    writer = _engine.StoreWriter(
        path, fields, samples, views, "bench-teacher", "bench-data", "bench-augment"
    )
    rng = np.random.default_rng(seed)
    step = 256
    for _ in range(views):
        for s in range(0, samples, step):
            m = min(step, samples - s)
            writer.append(
                [
                    rng.integers(0, 2**15, size=(m, *shape), dtype=np.int16)
                    for shape in TAPS.values()
                ],
                m,
            )
    writer.finish()
    return FeatureStore.open(path, num_threads=threads)


class Bench:
    """The store, random batches and the three references, sharing one set of bytes."""

    def __init__(self, path, samples=4096, views=2, device="cpu", threads=4):
        self.store = write_random_store(path, samples, views, threads=threads)
        self.device = torch.device(device)
        reader = self.store._get_reader()
        self.record_bytes = reader.record_bytes
        self.batch_bytes = BATCH * sum(reader.field_bytes)  # payload delivered per batch
        t0 = time.perf_counter()
        self.store.verify()  # reads every byte: warms the page cache
        self.verify_gbps = reader.file_bytes / (time.perf_counter() - t0) / 1e9
        rng = np.random.default_rng(1)
        n, k = samples, views
        self.batches = [(rng.integers(0, n, BATCH), rng.integers(0, k, BATCH)) for _ in range(64)]
        self.i = 0
        self.out = self.store.empty_batch(BATCH)
        self.mm = np.memmap(
            path,
            dtype=np.uint8,
            mode="r",
            offset=reader.data_offset,
            shape=(n * k, reader.record_bytes),
        )
        self.num_samples = n
        self.copy_dst = np.empty((BATCH, reader.record_bytes), dtype=np.uint8)

    def _next(self):
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]

    def gather(self):
        idx, v = self._next()
        return self.store.gather(idx, v, out=self.out)

    def copy(self):
        idx, v = self._next()
        start = int(v[0] * self.num_samples + idx[0]) % (self.mm.shape[0] - BATCH)
        np.copyto(self.copy_dst, self.mm[start : start + BATCH])

    def memmap(self):
        idx, v = self._next()
        return self.mm[v * self.num_samples + idx]

    def teacher(self):
        model = resnet56().eval().to(self.device)
        feats = {}
        for name in ("layer1", "layer2", "layer3"):
            getattr(model, name).register_forward_hook(
                lambda m, i, o, name=name: feats.__setitem__(name, o)
            )
        x = torch.randn(BATCH, 3, 32, 32, device=self.device)

        def run():
            with torch.no_grad():
                feats["logits"] = model(x)
            return feats

        return run


def measure(path, samples, views, device, threads=4):
    b = Bench(path, samples, views, device, threads)
    dev = b.device.type
    res = {
        "record_bytes": b.record_bytes,
        "batch_bytes": b.batch_bytes,
        "verify_GBps": b.verify_gbps,
    }
    res["gather_s"] = median_seconds(b.gather, 200, warmup=2)
    res["copy_s"] = median_seconds(b.copy, 200, warmup=2) * b.batch_bytes / (BATCH * b.record_bytes)
    res["hot_copy_s"] = copy_seconds(b.batch_bytes, repeats=200)
    res["memmap_s"] = median_seconds(b.memmap, 200, warmup=2)
    res["online_s"] = median_seconds(
        b.teacher(),
        3 if dev == "cpu" else 50,
        warmup=1 if dev == "cpu" else 5,
        device=dev,
    )
    if b.device.type == "cuda":  # gather into pinned buffers, then to the GPU: the trainer's path
        pinned = b.store.empty_batch(BATCH, pin_memory=True)

        def to_gpu():
            idx, v = b._next()
            got = b.store.gather(idx, v, out=pinned)
            return {k: t.to(b.device, non_blocking=True) for k, t in got.items()}

        res["gather_to_gpu_s"] = median_seconds(to_gpu, 200, warmup=2, device=dev)
    return res


def report(res, args):
    gbps = lambda s: res["batch_bytes"] / s / 1e9  # noqa: E731
    lines = [
        f"Command: `python benchmarks/bench_store.py --samples {args.samples} --views {args.views} "
        f"--device {args.device} --threads {args.threads}`",
        "",
        f"Batch: {BATCH} random records of {res['record_bytes']} bytes "
        f"({res['batch_bytes'] / 1e6:.2f} MB of payload: ResNet-56 layer1-3 + logits, fp16); "
        f"store {args.samples} samples x {args.views} views, warm page cache.",
        "",
        "| path | median per batch | GB/s | ratio |",
        "|---|---|---|---|",
        f"| store.gather ({args.threads} threads) | {res['gather_s'] * 1e3:.3f} ms | "
        f"{gbps(res['gather_s']):.2f} | 1 |",
        f"| plain copy of the same bytes from the mapped file | {res['copy_s'] * 1e3:.3f} ms | "
        f"{gbps(res['copy_s']):.2f} | gather = {res['copy_s'] / res['gather_s']:.2f} x "
        "copy bandwidth (target >= 0.70) |",
        f"| copy between two hot buffers (cache-resident) | {res['hot_copy_s'] * 1e3:.3f} ms | "
        f"{gbps(res['hot_copy_s']):.2f} | gather = {res['hot_copy_s'] / res['gather_s']:.2f} x |",
        f"| numpy memmap fancy indexing | {res['memmap_s'] * 1e3:.3f} ms | "
        f"{gbps(res['memmap_s']):.2f} | "
        f"gather {res['memmap_s'] / res['gather_s']:.2f}x faster (target > 1) |",
        f"| ResNet-56 online forward ({args.device}) | {res['online_s'] * 1e3:.3f} ms | - | "
        f"gather {res['online_s'] / res['gather_s']:.1f}x faster (target >= 10) |",
    ]
    if "gather_to_gpu_s" in res:
        lines.append(
            f"| gather into pinned + copy to GPU | {res['gather_to_gpu_s'] * 1e3:.3f} ms | "
            f"{gbps(res['gather_to_gpu_s']):.2f} | online forward / this = "
            f"{res['online_s'] / res['gather_to_gpu_s']:.1f}x |"
        )
    lines.append(
        f"\nverify(): {res['verify_GBps']:.2f} GB/s "
        "(XXH64 over the whole file, cold-ish first read)."
    )
    return "\n".join(lines)


# --- pytest-benchmark ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Bench(str(tmp_path_factory.mktemp("store") / "bench.akd"), samples=1024, views=2)


def test_gather(benchmark, bench):
    copy = (
        median_seconds(bench.copy, 50, warmup=2) * bench.batch_bytes / (BATCH * bench.record_bytes)
    )
    benchmark.extra_info["copy_fraction"] = copy / median_seconds(bench.gather, 50, warmup=2)
    benchmark(bench.gather)


def test_memmap_fancy_indexing(benchmark, bench):
    benchmark(bench.memmap)


def test_copy_same_bytes(benchmark, bench):
    benchmark(bench.copy)


def test_online_resnet56(benchmark, bench):
    benchmark.pedantic(bench.teacher(), rounds=3, iterations=1, warmup_rounds=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument(
        "--dir", default=None, help="where the temporary store goes (default: system temp)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        res = measure(
            os.path.join(d, "bench.akd"), args.samples, args.views, args.device, args.threads
        )
    print(report(res, args))


if __name__ == "__main__":
    main()
