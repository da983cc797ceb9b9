"""The CUDA side of the training paths (issue 16): the device-resident training split, pinned
non-blocking store reads, bf16/fp16 autocast with channels-last on a GPU, streamed folders
feeding a GPU. Marked ``cuda``: skipped without a GPU (none was lent when these were written,
so they have not run yet); scripts/gpu-throughput runs them on a lent machine."""

import math
from types import SimpleNamespace

import pytest
import torch

from autokd.data import load_data
from autokd.distill import Distiller
from autokd.models import build_model
from autokd.pipeline import load_or_train_teacher, make_augment, open_or_build_store, resolve_taps
from autokd.search.trial import Prepared, TrialRunner, TrialTask
from autokd.space import load_distiller
from autokd.train.loop import (
    TrainConfig,
    _epoch_source,
    _resident,
    stratified_subset,
    train_student,
)
from helpers import make_image_folder

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_paths")
    data = load_data("digits", val_fraction=0.1, seed=0)
    teacher = load_or_train_teacher(
        data,
        "digits_teacher",
        None,
        str(root / "teacher.pt"),
        epochs=2,
        device="cuda",
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
        device="cuda",
        log=lambda m: None,
        progress=False,
    )
    return data, teacher, aug, store


def test_training_split_is_copied_to_the_gpu_once(digits):
    data = digits[0]
    images, labels = _resident(data.train, torch.device("cuda"))
    assert images.is_cuda and labels.is_cuda
    again, _ = _resident(data.train, torch.device("cuda"))
    assert again is images  # cached on the split: one copy per process
    assert torch.equal(images.cpu(), data.train.images)


@pytest.mark.parametrize("offline", [True, False])
def test_gpu_batches_are_the_cpu_batches(digits, offline):
    data, _, aug, store = digits
    idx = stratified_subset(data.train.labels, 0.3, 0)
    for epoch in (0, 1):
        got = {}
        for dev in ("cpu", "cuda"):
            cfg = TrainConfig(epochs=2, batch_size=64, offline=offline, seed=0, device=dev)
            order, make_batch = _epoch_source(
                data, cfg, idx, epoch, store if offline else None, aug
            )
            got[dev] = (order, make_batch(order[:64]))
        (o_cpu, (x_cpu, y_cpu, tf_cpu, tl_cpu)), (o_gpu, (x_gpu, y_gpu, tf_gpu, tl_gpu)) = (
            got["cpu"],
            got["cuda"],
        )
        assert torch.equal(o_cpu, o_gpu)
        assert x_gpu.is_cuda and torch.equal(x_gpu.cpu(), x_cpu)  # a gather: bit for bit
        assert torch.equal(y_gpu.cpu(), y_cpu)
        if offline:
            # teacher records stay on the host, pinned, for the loop's non-blocking copy
            assert all(t.is_pinned() for t in tf_gpu.values()) and tl_gpu.is_pinned()
            assert torch.equal(tl_gpu, tl_cpu)
            assert all(torch.equal(tf_gpu[k], tf_cpu[k]) for k in tf_cpu)


@pytest.mark.parametrize(
    "precision, channels_last", [("fp32", False), ("bf16", True), ("fp16", True)]
)
def test_proxy_trial_on_the_gpu(digits, precision, channels_last):
    data, teacher, aug, store = digits
    proxy = TrainConfig(
        epochs=20,
        batch_size=32,
        lr=0.1,
        subset=0.5,
        stop_fraction=0.5,
        sparsity=0.5,
        offline=True,
        device="cuda",
        precision=precision,
        channels_last=channels_last,
    )

    cfg = SimpleNamespace(proxy=proxy, student="digits_student", seed=0, reward="paper")
    runner = TrialRunner(
        cfg,
        Prepared(data, teacher, store, aug, resolve_taps("digits_student", None)),
        device="cuda",
    )
    out = runner.run(TrialTask(0, None, None, load_distiller("kd").to_dict(), seed=0))
    assert out["status"] == "ok" and math.isfinite(out["reward"])
    assert out["metrics"]["val_acc"] > 0.3


def test_streamed_folder_feeds_the_gpu(tmp_path):
    make_image_folder(tmp_path / "images")
    data = load_data(f"folder:{tmp_path / 'images'}?stream=1&size=16&workers=2", seed=0)
    aug = make_augment(data, 0)
    loader = data.train.loader(aug, device="cuda")
    ids = [torch.arange(0, 32), torch.arange(32, 64)]
    batches = list(loader.batches(ids, 3))
    loader.close()
    for b, (x, y) in zip(ids, batches):
        assert x.is_cuda and y.is_cuda
        want = data.train.normalise(torch.stack([data.train.decode(int(i), aug, 3) for i in b]))
        torch.testing.assert_close(x.cpu(), want, atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=5, in_channels=3)
    d = Distiller("none", student).to("cuda")
    res = train_student(
        d,
        student,
        data,
        TrainConfig(
            epochs=1,
            batch_size=32,
            offline=False,
            device="cuda",
            precision="bf16",
            channels_last=True,
        ),
        augment=aug,
    )
    assert math.isfinite(res.final_loss)
