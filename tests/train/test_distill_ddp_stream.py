"""`distill` data parallel (DDP over Gloo, 2 CPU processes) on a streamed image folder
(autokd.data.stream): each rank decodes its share of every global batch in its own DataLoader
worker process, reads the feature store, and the two ranks train the student one process
trains.

Tolerance: the 2-process run adds the same numbers in another order (half-batch gradients
averaged, BatchNorm statistics summed per rank then across ranks; see
tests/train/test_distill_ddp.py). On these 3x16x16 images over 10 SGD steps the largest
differences measured are 1.1e-4 on a weight (the first convolution's, |w| <= 0.44) and 7e-4 on
a BatchNorm running variance of 1.5, so the bound is atol = rtol = 1e-3. The control: the same
single-process run whose crops come from another augmentation seed (the other views of the
same samples, what a rank reading the wrong views would train) differs by 0.046, more than ten
times the bound."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from autokd.data import load_data
from autokd.models import build_model
from autokd.pipeline import make_augment, open_or_build_store
from autokd.store import teacher_hash
from autokd.train.distributed import DistContext
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig
from autokd.train.teacher import save_checkpoint
from helpers import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread_module")

ATOL, RTOL = 1e-3, 1e-3
# 288 training images (320 less 10% held out) at global batch 64: 4 batches of 64 and one of
# 32, each split evenly over 2 ranks, so the global batches are exactly the single-process ones
CFG = {"epochs": 2, "batch_size": 64, "lr": 0.05, "offline": True, "seed": 3}


class _Teacher:
    def __init__(self, path, data):
        torch.manual_seed(1)
        self.model = build_model("resnet8", num_classes=data.num_classes, in_channels=3).eval()
        save_checkpoint(path, self.model, {"model": "resnet8"})
        self.name, self.checkpoint, self.taps = "resnet8", path, ["layer3"]
        self.hash, self.test_accuracy = teacher_hash(self.model), None


def _spec(folder):
    return f"folder:{folder}?stream=1&size=16&workers=1"


def _distill(folder, root, out, dist=None, aug_seed=0):
    data = load_data(_spec(folder), val_fraction=0.1, seed=0)
    teacher = _Teacher(os.path.join(root, "teacher.pt"), data)
    aug = make_augment(data, aug_seed)
    store = open_or_build_store(
        os.path.join(root, f"store{aug_seed}.akds"),
        teacher,
        data,
        aug,
        views=2,
        dtype="fp32",
        log=lambda m: None,
        progress=False,
    )
    run_distill(
        resolve_spec("kd"),
        data,
        teacher,
        "resnet8",
        ["layer3"],
        TrainConfig(**CFG),
        str(out),
        store=store,
        augment=aug,
        log=lambda m: None,
        progress=False,
        dist=dist,
    )


def _worker(rank, port, folder, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = DistContext(rank=rank, world_size=2, device="cpu", sync_bn=True)
    ctx.init()
    try:
        _distill(folder, root, os.path.join(root, "ddp"), dist=ctx)
    finally:
        ctx.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_distill_on_a_streamed_folder_trains_the_single_process_student(tmp_path):
    folder = tmp_path / "images"
    make_image_folder(folder)
    root = str(tmp_path)
    _distill(str(folder), root, tmp_path / "single")  # builds the store, once
    mp.spawn(_worker, args=(_free_port(), str(folder), root), nprocs=2, join=True)
    want = torch.load(tmp_path / "single" / "student.pt", weights_only=True)
    got = torch.load(tmp_path / "ddp" / "student.pt", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=f"student tensor {k}")
    _distill(str(folder), root, tmp_path / "other_views", aug_seed=1)
    other = torch.load(tmp_path / "other_views" / "student.pt", weights_only=True)
    assert (
        max(float((other[k] - want[k]).abs().max()) for k in want if want[k].is_floating_point())
        > 10 * ATOL
    )
