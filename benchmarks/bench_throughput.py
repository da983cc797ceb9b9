"""Throughput a user can trust: proxy trials per hour and images per second of ``distill``,
against a plain eager PyTorch KD loop measured in the same run.

Data: synthetic tensors of CIFAR-100's shape (3x32x32, 100 classes; speed does not depend on
the pixels). Pairs: ResNet-56 -> ResNet-20 and ResNet-32x4 -> ResNet-8x4 (the CIFAR zoo),
teachers freshly initialised (the speed of a forward pass does not depend on the weights).

Providers, each training the same images for the same epochs at batch 64 with SGD:
- ``eager``: the loop users write: a ``Dataset`` whose ``__getitem__`` applies torchvision's
  ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()`` to one image, a ``DataLoader``
  (shuffle; ``workers`` processes, pinned memory on CUDA), the teacher run online on every
  batch under ``no_grad``, fp32, ``CE + tau^2 KL(softmax(t/tau) || softmax(s/tau))`` with
  ``F.kl_div``, then the held-out accuracy.
- ``autokd``: one proxy trial as a search runs it (``TrialRunner.run``): KD from the feature
  store (teacher features and logits replayed with the stored augmentation), 50% sparse student
  with the masked fused SGD step, fp32, then the proxy reward (CE + CKA) on the held-out split.
- ``autokd_bf16_cl``: the same with ``precision="bf16"`` and channels-last inputs.
The feature store is built once per pair before timing (a search builds it once for all its
trials); its build time is reported beside the trials. ``distill`` images per second: the real
``run_distill`` (online teacher, dense, the KD spec; fp32, and bf16 with channels-last inputs)
over the same data, training loop only, interleaved with the eager loop's training loop.

Every provider runs ``rounds`` times, interleaved (eager, autokd, autokd_bf16_cl, eager, ...),
and the figures are medians, so load from other processes hits all of them alike.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_throughput.py -s     # CPU sizes
    python benchmarks/bench_throughput.py                                    # CPU, markdown
    python benchmarks/bench_throughput.py --full --device cuda               # a GPU (see --help)

Sizes: the smoke run (``--benchmark-disable``) trains 32 images for 1 epoch; a timed pytest
run 512 images, 1 epoch, 3 rounds; ``--full`` 10,000 images (the paper's 20% subset of
CIFAR-100's training split) with 5,000 held out, 2 epochs, 8 DataLoader workers for the eager
loop. The paper's proxy trains 48 epochs (20% of 240): per-trial times here are for the epochs
measured, and both providers carry the same fixed costs (held-out evaluation), so the ratio at
2 epochs is the ratio of the proxy's per-epoch cost.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

from autokd.data import DataBundle, ImageTensorDataset
from autokd.models import build_model
from autokd.pipeline import TeacherInfo
from autokd.search.trial import Prepared, TrialRunner, TrialTask
from autokd.space import load_distiller
from autokd.store import FeatureStore, ReplayAugment, teacher_hash
from autokd.train.final import run_distill
from autokd.train.loop import TrainConfig

PAIRS = {
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
}
PROVIDERS = ("eager", "autokd", "autokd_bf16_cl")
DISTILL = ("eager", "distill_fp32", "distill_bf16_cl")
TAU, LR, NUM_CLASSES = 4.0, 0.05, 100


@dataclass(frozen=True)
class Sizes:
    train: int
    val: int
    epochs: int
    rounds: int
    workers: int  # DataLoader workers of the eager loop
    batch: int = 64
    views: int = 2
    warmup: bool = True  # one untimed trial per provider first


SMOKE = Sizes(train=32, val=16, epochs=1, rounds=1, workers=0, batch=16, views=1, warmup=False)
CPU = Sizes(train=512, val=128, epochs=1, rounds=3, workers=0)
FULL = Sizes(train=10_000, val=5_000, epochs=2, rounds=1, workers=8)


def synthetic_cifar100(train: int, val: int, seed: int = 0) -> DataBundle:
    """A DataBundle of CIFAR-100's shape: normal pixels (already "normalised"), uniform labels."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return ImageTensorDataset(
            torch.randn(n, 3, 32, 32, generator=g),
            torch.randint(0, NUM_CLASSES, (n,), generator=g),
            torch.arange(n),
        )

    tr, va = split(train), split(val)
    return DataBundle(
        name="synthetic",
        spec="synthetic",
        num_classes=NUM_CLASSES,
        channels=3,
        image_size=(32, 32),
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        train=tr,
        val=va,
        test=va,
        identity=f"synthetic-cifar100|train={train}|val={val}|seed={seed}",
        allow_flip=True,
    )


class _CropFlip(torch.utils.data.Dataset):
    """Per-item torchvision augmentation of tensors, as a user's CIFAR Dataset does."""

    def __init__(self, images, labels, train: bool):
        self.images, self.labels = images, labels
        self.tf = (
            transforms.Compose(
                [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
            )
            if train
            else None
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.tf(x) if self.tf is not None else x), self.labels[i]


def eager_kd_trial(teacher, student_name: str, data, sizes: Sizes, device: str, seed: int = 0):
    """The plain eager KD loop (module docstring): (seconds of the training loop, seconds in
    all, held-out accuracy)."""
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    student = build_model(student_name, num_classes=NUM_CLASSES, in_channels=3).to(device)
    pin = device.startswith("cuda")
    kw = {"num_workers": sizes.workers, "pin_memory": pin, "persistent_workers": sizes.workers > 0}
    train = torch.utils.data.DataLoader(
        _CropFlip(data.train.images, data.train.labels, True),
        batch_size=sizes.batch,
        shuffle=True,
        **kw,
    )
    val = torch.utils.data.DataLoader(
        _CropFlip(data.val.images, data.val.labels, False), batch_size=256, **kw
    )
    opt = torch.optim.SGD(
        student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    teacher.eval()
    t_loop = time.perf_counter()
    for _ in range(sizes.epochs):
        student.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            kl = (
                F.kl_div(
                    F.log_softmax(s / TAU, dim=1), F.softmax(t / TAU, dim=1), reduction="batchmean"
                )
                * TAU
                * TAU
            )
            loss = F.cross_entropy(s, y) + kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync(device)
    loop = time.perf_counter() - t_loop
    student.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((student(x.to(device)).argmax(1) == y.to(device)).sum())
    return loop, time.perf_counter() - t_all, correct / len(data.val)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PairBench:
    """One teacher/student pair on synthetic data: the store built once, then trials."""

    def __init__(self, pair: str, sizes: Sizes, device: str, workdir: str):
        t_name, s_name = PAIRS[pair]
        self.pair, self.sizes, self.device, self.student = pair, sizes, device, s_name
        self.data = synthetic_cifar100(sizes.train, sizes.val)
        torch.manual_seed(1)
        model = build_model(t_name, num_classes=NUM_CLASSES, in_channels=3).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.teacher = TeacherInfo(model, t_name, "", ["layer3"], teacher_hash(model), None)
        self.augment = ReplayAugment(seed=0, crop_padding=4, flip=True)
        self.workdir = workdir
        self.runners = {}
        self._store, self.store_seconds = None, float("nan")

    @property
    def store(self) -> FeatureStore:
        """Built on first use, timed: what a search does once before its first trial."""
        if self._store is None:
            t0 = time.perf_counter()
            self._store = FeatureStore.build(
                os.path.join(self.workdir, f"{self.pair}.akds"),
                self.teacher.model,
                self.data.train,
                taps=["layer3"],
                views=self.sizes.views,
                dtype="fp16",
                batch_size=256,
                augment=self.augment,
                dataset_id=self.data.identity,
                progress=False,
                device=self.device,
            )
            _sync(self.device)
            self.store_seconds = time.perf_counter() - t0
        return self._store

    def _runner(self, provider: str) -> TrialRunner:
        if provider not in self.runners:
            bf16 = provider == "autokd_bf16_cl"
            proxy = TrainConfig(
                epochs=self.sizes.epochs,
                batch_size=self.sizes.batch,
                lr=LR,
                subset=1.0,
                stop_fraction=1.0,
                sparsity=0.5,
                offline=True,
                device=self.device,
                precision="bf16" if bf16 else "fp32",
                channels_last=bf16,
            )
            cfg = SimpleNamespace(proxy=proxy, student=self.student, seed=0, reward="paper")
            prepared = Prepared(self.data, self.teacher, self.store, self.augment, ["layer3"])
            self.runners[provider] = TrialRunner(cfg, prepared, device=self.device)
        return self.runners[provider]

    def trial(self, provider: str):
        """(training-loop seconds, whole-trial seconds, held-out accuracy)."""
        if provider == "eager":
            return eager_kd_trial(
                self.teacher.model, self.student, self.data, self.sizes, self.device
            )
        if provider.startswith("distill"):
            t0 = time.perf_counter()
            loop = self.distill(provider == "distill_bf16_cl")
            return loop, time.perf_counter() - t0, float("nan")
        runner = self._runner(provider)
        task = TrialTask(0, None, None, load_distiller("kd").to_dict(), seed=0)
        t0 = time.perf_counter()
        out = runner.run(task)
        _sync(self.device)
        return out["metrics"]["train_seconds"], time.perf_counter() - t0, out["metrics"]["val_acc"]

    def compare(self, providers=PROVIDERS):
        """Interleaved rounds; {provider: {median seconds, trials per hour, ratio to eager}}."""
        times = {p: [] for p in providers}
        loops = {p: [] for p in providers}
        for p in providers if self.sizes.warmup else ():
            self.trial(p)  # warm-up: first-call costs (allocator, oneDNN/cuDNN plans)
        for _ in range(self.sizes.rounds):
            for p in providers:
                loop, total, _ = self.trial(p)
                times[p].append(total)
                loops[p].append(loop)
        images = self.sizes.train * self.sizes.epochs
        out = {}
        for p in providers:
            t, lp = statistics.median(times[p]), statistics.median(loops[p])
            out[p] = {
                "trial_s": t,
                "trials_per_hour": 3600.0 / t,
                "train_images_per_s": images / lp,
            }
        if "eager" in out:
            for p in providers:
                out[p]["vs_eager"] = out["eager"]["trial_s"] / out[p]["trial_s"]
        return out

    def distill(self, bf16: bool = False) -> float:
        """Seconds of ``run_distill``'s training loop (online KD, dense; checkpoints included)
        on the pair's data, in fp32 or bf16 with channels-last inputs."""
        cfg = TrainConfig(
            epochs=self.sizes.epochs,
            batch_size=self.sizes.batch,
            lr=LR,
            offline=False,
            device=self.device,
            precision="bf16" if bf16 else "fp32",
            channels_last=bf16,
        )
        out = tempfile.mkdtemp(dir=self.workdir)
        res = run_distill(
            load_distiller("kd"),
            self.data,
            self.teacher,
            self.student,
            ["layer3"],
            cfg,
            out,
            augment=self.augment,
            log=lambda m: None,
            progress=False,
        )
        _sync(self.device)
        return res.seconds


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the ratios stable
    yield
    torch.set_num_threads(n)


@pytest.mark.benchmark(group="throughput proxy trial")
@pytest.mark.parametrize("pair", list(PAIRS))
def test_proxy_trials_per_hour(benchmark, pair, tmp_path):
    sizes = SMOKE if benchmark.disabled else CPU
    bench = PairBench(pair, sizes, "cpu", str(tmp_path))
    res = bench.compare()
    benchmark.extra_info.update(
        {
            "sizes": vars(sizes),
            "store_build_s": bench.store_seconds,
            **{f"{p}_{k}": v for p, r in res.items() for k, v in r.items()},
        }
    )
    for p, r in res.items():
        print(
            f"\n{pair} {p}: {r['trial_s']:.2f} s/trial, {r['trials_per_hour']:.0f} trials/h, "
            f"{r['vs_eager']:.2f}x eager"
        )
    assert all(math.isfinite(r["trial_s"]) for r in res.values())
    benchmark.pedantic(lambda: bench.trial("autokd"), rounds=1, iterations=1)


@pytest.mark.benchmark(group="throughput distill")
@pytest.mark.parametrize("pair", list(PAIRS))
def test_distill_images_per_second(benchmark, pair, tmp_path):
    sizes = SMOKE if benchmark.disabled else CPU
    bench = PairBench(pair, sizes, "cpu", str(tmp_path))
    res = bench.compare(DISTILL)
    ips = {p: r["train_images_per_s"] for p, r in res.items()}
    benchmark.extra_info.update({f"{p}_images_per_s": v for p, v in ips.items()})
    print(
        f"\n{pair} distill images/s: "
        + ", ".join(f"{p} {v:.0f} ({v / ips['eager']:.2f}x)" for p, v in ips.items())
    )
    benchmark.pedantic(bench.distill, rounds=1, iterations=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="GPU sizes (module docstring)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--pairs", default=",".join(PAIRS), help="comma-separated, of " + ", ".join(PAIRS)
    )
    ap.add_argument("--train", type=int, default=None, help="training images per trial")
    ap.add_argument("--val", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="eager DataLoader workers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = ap.parse_args(argv)
    base = FULL if args.full else CPU
    sizes = Sizes(
        **{
            k: (getattr(args, k) if getattr(args, k, None) is not None else v)
            for k, v in vars(base).items()
        }
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    where = (
        torch.cuda.get_device_name()
        if dev.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}; {sizes}")
    print("\n| pair | provider | s per trial | trials per hour | vs eager | train images/s |")
    print("|---|---|---|---|---|---|")
    distill_rows = []
    with tempfile.TemporaryDirectory() as work:
        for pair in args.pairs.split(","):
            bench = PairBench(pair, sizes, dev, work)
            res = bench.compare()
            for p, r in res.items():
                print(
                    f"| {pair} | {p} | {r['trial_s']:.2f} | {r['trials_per_hour']:.0f} | "
                    f"{r['vs_eager']:.2f}x | {r['train_images_per_s']:.0f} |",
                    flush=True,
                )
            print(
                f"| {pair} | (feature store build, once per search: {sizes.views} views) | "
                f"{bench.store_seconds:.2f} | | | |",
                flush=True,
            )
            res = bench.compare(DISTILL)
            eager = res["eager"]["train_images_per_s"]
            for p, r in res.items():
                ips = r["train_images_per_s"]
                distill_rows.append(f"| {pair} | {p} | {ips:.0f} | {ips / eager:.2f}x |")
    print("\n| pair | training loop | train images/s | vs eager |\n|---|---|---|---|")
    print("\n".join(distill_rows))


if __name__ == "__main__":
    main()
