"""Two teachers offline: one feature store per teacher (what autokd does) vs one store of both.

``autokd.pipeline.open_or_build_stores`` keeps one store file per teacher (reasons in its
docstring: the one-teacher format and identity check unchanged, a teacher's store reusable by
every run that has that teacher). Its price is one more gather per batch and teacher. This
measures that price against the alternative, one store whose records hold both teachers'
fields, on the same bytes in the same run, and against what a proxy trial does with each batch
(a ResNet-20 student's forward and backward on the batch's 128 32x32 images, CPU or GPU).

Teachers (fp16 records, random bytes: gather speed does not depend on the values):
  A: a CIFAR ResNet-56's taps (layer1 [16,32,32], layer2 [32,16,16], layer3 [64,8,8], logits)
  B: a ResNet-32x4's last stage (layer3 [256,8,8], logits [100])

    python benchmarks/bench_teacher_stores.py [--samples 4096 --views 2 --device cpu]  # a table
    pytest benchmarks/bench_teacher_stores.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from autokd import _engine
from autokd.store import FeatureStore
from common import median_seconds

BATCH = 128
TEACHER_A = {"layer1": [16, 32, 32], "layer2": [32, 16, 16], "layer3": [64, 8, 8], "logits": [100]}
TEACHER_B = {"layer3": [256, 8, 8], "logits": [100]}


def write_random_store(path, fields, samples, views, seed, threads=4):
    spec = [(name, "fp16", shape) for name, shape in fields.items()]
    writer = _engine.StoreWriter(
        path, spec, samples, views, f"bench-{seed}", "bench-data", "bench-augment"
    )
    rng = np.random.default_rng(seed)
    for _ in range(views):
        for s in range(0, samples, 256):
            m = min(256, samples - s)
            writer.append(
                [
                    rng.integers(0, 2**15, size=(m, *shape), dtype=np.int16)
                    for shape in fields.values()
                ],
                m,
            )
    writer.finish()
    store = FeatureStore.open(path, num_threads=threads)
    store.verify()  # reads every byte: warms the page cache
    return store


class Bench:
    def __init__(self, folder, samples=4096, views=2, device="cpu", threads=4):
        self.a = write_random_store(
            os.path.join(folder, "a.akds"), TEACHER_A, samples, views, 1, threads
        )
        self.b = write_random_store(
            os.path.join(folder, "b.akds"), TEACHER_B, samples, views, 2, threads
        )
        both = {f"a.{k}": v for k, v in TEACHER_A.items()}
        both.update({f"b.{k}": v for k, v in TEACHER_B.items()})
        self.one = write_random_store(
            os.path.join(folder, "ab.akds"), both, samples, views, 3, threads
        )
        rng = np.random.default_rng(0)
        # one epoch reads one view: a batch is 128 random samples of one view
        self.batches = [
            (rng.integers(0, samples, BATCH), int(rng.integers(0, views))) for _ in range(64)
        ]
        self.i = 0
        self.out_a, self.out_b = self.a.empty_batch(BATCH), self.b.empty_batch(BATCH)
        self.out_one = self.one.empty_batch(BATCH)
        self.device = torch.device(device)

    def _next(self):
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]

    def per_teacher(self):
        idx, v = self._next()
        return [self.a.gather(idx, v, out=self.out_a), self.b.gather(idx, v, out=self.out_b)]

    def one_store(self):
        idx, v = self._next()
        return self.one.gather(idx, v, out=self.out_one)

    def student_step(self):
        from autokd.models import build_model

        model = build_model("resnet20", num_classes=100, in_channels=3).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(BATCH, 3, 32, 32, device=self.device)
        y = torch.randint(0, 100, (BATCH,), device=self.device)

        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run


def measure(folder, samples, views, device, threads):
    b = Bench(folder, samples, views, device, threads)
    dev = b.device.type
    return {
        "per_teacher_s": median_seconds(b.per_teacher, 200, warmup=2),
        "one_store_s": median_seconds(b.one_store, 200, warmup=2),
        "step_s": median_seconds(
            b.student_step(), 5 if dev == "cpu" else 50, warmup=1 if dev == "cpu" else 5, device=dev
        ),
        "batch_bytes": BATCH * (b.a.record_bytes + b.b.record_bytes),
    }


def report(res, args):
    extra = res["per_teacher_s"] - res["one_store_s"]
    rows = [
        (
            f"Command: `python benchmarks/bench_teacher_stores.py --samples {args.samples} --views "
            f"{args.views} --device {args.device} --threads {args.threads}`"
        ),
        "",
        (
            f"Batch: {BATCH} random samples of one view, {res['batch_bytes'] / 1e6:.2f} MB of "
            "payload (teachers A and B, fp16), warm page cache."
        ),
        "",
        "| path | median per batch | ratio |",
        "|---|---|---|",
        (
            f"| one store per teacher: 2 gathers | {res['per_teacher_s'] * 1e3:.3f} ms | "
            f"{res['per_teacher_s'] / res['one_store_s']:.2f} x one store |"
        ),
        f"| one store of both teachers: 1 gather | {res['one_store_s'] * 1e3:.3f} ms | 1 |",
        (
            f"| ResNet-20 student step, fwd+bwd+SGD ({args.device}) | {res['step_s'] * 1e3:.3f} ms "
            f"| the second gather's cost = {100 * extra / res['step_s']:.2f}% of a step |"
        ),
    ]
    return "\n".join(rows)


# --- pytest-benchmark ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Bench(str(tmp_path_factory.mktemp("stores")), samples=1024, views=2)


def test_gather_one_store_per_teacher(benchmark, bench):
    benchmark.extra_info["one_store_s"] = median_seconds(bench.one_store, 50, warmup=2)
    benchmark(bench.per_teacher)


def test_gather_one_store_of_both(benchmark, bench):
    benchmark(bench.one_store)


def test_student_step_resnet20(benchmark, bench):
    benchmark.pedantic(bench.student_step(), rounds=3, iterations=1, warmup_rounds=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--dir", default=None, help="where the temporary stores go")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        res = measure(d, args.samples, args.views, args.device, args.threads)
    print(report(res, args))


if __name__ == "__main__":
    main()
