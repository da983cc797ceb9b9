"""`distill` data parallel (DDP over Gloo, 2 CPU processes) trains the student one process trains.

One `torch.multiprocessing.spawn` of two ranks runs every DDP scenario (process start-up is the
expensive part); the single-process references run in the test process.

Tolerance: the 2-process run adds the same numbers in another order (DDP averages two half-batch
gradients; synchronised BN sums per rank, then across ranks, with a two-pass variance instead of
the fused kernel; the reference runs with more threads). Over the 8 SGD steps here (fitnet's
feature weight 100 amplifies) the largest difference measured is 3e-6, at most 8% of the bound
atol + rtol * |w| with atol 1e-5, rtol 1e-4; per-rank BatchNorm (also run below) exceeds that
bound ~800-fold (differences 4e-2 to 9e-2), so the test tells the two apart with margin both ways.
"""

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from autokd.cli import main
from autokd.data import load_data
from autokd.pipeline import load_or_train_teacher, make_augment, open_or_build_store, resolve_taps
from autokd.train import final, loop, sparse
from autokd.train.distributed import (
    DistContext,
    EpochShardSampler,
    GlooSyncBatchNorm,
    convert_sync_batchnorm,
)
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig, _epoch_source, stratified_subset

ATOL, RTOL = 1e-5, 1e-4
# subset 0.15 of digits at seed 3 is 196 samples: 3 full batches of 64 and a tail of 4, which
# splits evenly over 2 ranks, so the global batches are exactly the single-process ones
BASE = dict(epochs=2, batch_size=64, lr=0.05, subset=0.15, offline=False, seed=3)


def _config(**kw):
    return TrainConfig(**{**BASE, **kw})


class _CaptureSparsity:
    """Patch make_optimizer so that masks change every 2 steps, by gradient regrow (the
    all-reduced gradients choose the regrown weights): a short run exercises prune and regrow.
    Keeps the SparsityManager it made."""

    def __enter__(self):
        self.real, self.managers = sparse.make_optimizer, []

        def make(*a, sparsity_kwargs=None, **k):
            kw = {**(sparsity_kwargs or {}), "update_every": 2, "regrow": "gradient"}
            opt, manager = self.real(*a, sparsity_kwargs=kw, **k)
            self.managers.append(manager)
            return opt, manager

        # the training loop imports make_optimizer by name: patch its reference too
        sparse.make_optimizer = loop.make_optimizer = make
        return self

    def __exit__(self, *exc):
        sparse.make_optimizer = loop.make_optimizer = self.real

    def masks(self):
        m = self.managers[0]
        assert m.updates > 0, "the topology never changed; the check would be empty"
        return {n: v.to(torch.int64).flatten().tolist() for n, v in sorted(m.masks.items())}


def _distill(teacher_path, out, cfg, spec="fitnet", dist=None):
    data = load_data("digits", val_fraction=0.1, seed=0)
    teacher = load_or_train_teacher(
        data, "digits_teacher", teacher_path, None, epochs=1, log=lambda m: None, progress=False
    )
    store = None
    if cfg.offline:  # built by the fixture beside the teacher
        store = open_or_build_store(
            os.path.join(os.path.dirname(teacher_path), "store.akds"),
            teacher,
            data,
            make_augment(data, 0),
            views=2,
            dtype="fp32",
            log=lambda m: None,
            progress=False,
        )
    logs = []
    run_distill(
        resolve_spec(spec),
        data,
        teacher,
        "digits_student",
        resolve_taps("digits_student", None),
        cfg,
        str(out),
        store=store,
        augment=make_augment(data, 0),
        log=logs.append,
        progress=False,
        dist=dist,
    )
    return logs


def _cli(out, teacher_path, *extra):
    """``autokd-cli distill`` as torchrun would start rank RANK of it (the caller sets the
    environment); its output."""
    r = CliRunner().invoke(
        main,
        [
            "distill",
            "--spec",
            "kd",
            "--out",
            str(out),
            "--teacher-checkpoint",
            str(teacher_path),
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--quiet",
            *extra,
        ],
    )
    return r.exit_code, r.output


def _worker(rank, port, teacher_path, jobs, report_dir):
    """One rank: every job in turn, in one process group; what it saw goes to a file."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    report = {"saves": {}, "masks": {}, "logs": {}}
    real_save = final.torch.save
    for name, out, cfg_kw, sync_bn, spec in jobs:
        saves = report["saves"][name] = []

        def recording_save(obj, path, *a, **k):
            # files only (atomic writes pass the open temporary file; the RNG states' all-gather
            # pickles through torch.save into memory), named without the ".tmp<pid>" suffix
            target = getattr(path, "name", path)
            if isinstance(target, (str, os.PathLike)):
                saves.append(os.path.basename(str(target)).split(".tmp")[0])
            real_save(obj, path, *a, **k)

        final.torch.save = recording_save
        ctx = DistContext(rank=rank, world_size=2, device="cpu", sync_bn=sync_bn)
        ctx.init()  # the first job creates the group, the others find it
        try:
            with _CaptureSparsity() as cap:
                report["logs"][name] = _distill(
                    teacher_path, out, _config(**cfg_kw), spec=spec, dist=ctx
                )
        finally:
            final.torch.save = real_save
        if cap.managers[0] is not None:
            report["masks"][name] = cap.masks()
    # last: the command closes the process group when it ends
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    report["cli"] = _cli(os.path.join(report_dir, "cli"), teacher_path)
    ctx.close()
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(out):
    return torch.load(os.path.join(out, "student.pt"), weights_only=True)


def _assert_same_student(got, want):
    """The students saved in two run folders agree tensor by tensor (BN statistics included)."""
    got, want = _weights(got), _weights(want)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=f"student tensor {k}")


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, a single-process checkpoint cut after epoch 1, and one 2-rank
    spawn of all DDP jobs."""
    root = tmp_path_factory.mktemp("ddp")
    teacher_path = str(root / "teacher.pt")
    data = load_data("digits", val_fraction=0.1, seed=0)
    load_or_train_teacher(
        data, "digits_teacher", None, teacher_path, epochs=1, log=lambda m: None, progress=False
    )
    assert len(stratified_subset(data.train.labels, BASE["subset"], BASE["seed"])) % 2 == 0

    _distill(teacher_path, root / "single", _config())
    _distill(teacher_path, root / "single_offline", _config(offline=True))  # builds the store
    with _CaptureSparsity() as cap:
        _distill(teacher_path, root / "single_sparse", _config(sparsity=0.5), spec="kd")
    single_masks = cap.masks()

    real_save, saves = final.torch.save, []

    def save_then_die(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        saves.append(path)
        if len(saves) == 2:  # epoch 1 half-written: the checkpoint on disk is epoch 0's
            raise KeyboardInterrupt

    final.torch.save = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            _distill(teacher_path, root / "resumed", _config())
    finally:
        final.torch.save = real_save

    jobs = [  # (name, out, config, sync_bn, spec)
        ("dense", str(root / "ddp"), {}, True, "fitnet"),
        ("resumed", str(root / "resumed"), {}, True, "fitnet"),
        ("sparse", str(root / "ddp_sparse"), {"sparsity": 0.5}, True, "kd"),
        ("per_rank_bn", str(root / "ddp_local_bn"), {}, False, "fitnet"),
        ("offline", str(root / "ddp_offline"), {"offline": True}, True, "fitnet"),
    ]
    mp.spawn(_worker, args=(_free_port(), teacher_path, jobs, str(root)), nprocs=2)
    reports = [json.load(open(root / f"rank{r}.json")) for r in range(2)]
    return root, reports, single_masks


@pytest.mark.slow
@pytest.mark.parametrize("run", ["", "_offline"])
def test_two_processes_train_the_single_process_student(runs, run):
    """Online (the teacher runs on each rank's share) and offline (each rank gathers its share of
    the feature store)."""
    root, _, _ = runs
    # BN running statistics included: synchronised BN saw the global batch
    _assert_same_student(root / f"ddp{run}", root / f"single{run}")
    res = json.load(open(root / f"ddp{run}" / "result.json"))
    assert res["processes"] == 2
    # not asserted equal: this barely trained student's logits nearly tie, and a 1e-7 change can
    # move one argmax among the 359 test images
    one = json.load(open(root / f"single{run}" / "result.json"))["test_accuracy"]
    assert abs(res["test_accuracy"] - one) <= 2 / 359


@pytest.mark.slow
def test_per_rank_batchnorm_is_not_the_single_process_student(runs):
    """The other BN choice: statistics over 32 samples per rank instead of 64 (the tolerance
    above would catch it)."""
    root, _, _ = runs
    assert _max_diff(_weights(root / "single"), _weights(root / "ddp_local_bn")) > 100 * ATOL


@pytest.mark.slow
def test_rank_zero_alone_writes(runs):
    root, reports, _ = runs
    rank0, rank1 = reports
    assert rank0["saves"]["dense"] == ["checkpoint.pt"] * BASE["epochs"] + ["student.pt"]
    assert all(not saves for saves in rank1["saves"].values())
    assert all(not logs for logs in rank1["logs"].values())
    assert not any(p.endswith(".tmp") for p in os.listdir(root / "ddp"))


@pytest.mark.slow
def test_two_processes_resume_a_checkpoint(runs):
    """A single-process run cut after epoch 0; 2 processes continue it from epoch 1 to the
    student of the uninterrupted runs."""
    root, reports, _ = runs
    assert any("resuming" in m and "after epoch 1" in m for m in reports[0]["logs"]["resumed"])
    assert reports[0]["saves"]["resumed"] == ["checkpoint.pt", "student.pt"]  # epoch 1 only
    ck = torch.load(root / "resumed" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == BASE["epochs"] - 1
    _assert_same_student(root / "resumed", root / "single")


@pytest.mark.slow
def test_sparsity_masks_identical_on_every_rank(runs):
    root, reports, single_masks = runs
    assert reports[0]["masks"]["sparse"] == reports[1]["masks"]["sparse"]
    assert reports[0]["masks"]["sparse"] == single_masks
    _assert_same_student(root / "ddp_sparse", root / "single_sparse")


@pytest.mark.slow
def test_cli_under_torchrun(runs):
    """The command itself in 2 ranks: one line of output, from rank 0; rank 0's files."""
    root, reports, _ = runs
    (code0, out0), (code1, out1) = reports[0]["cli"], reports[1]["cli"]
    assert code0 == code1 == 0, out0 + out1
    assert (
        "data parallel: 2 processes (gloo), global batch 64 = 2 x 32, synchronised BatchNorm"
        in out0
    )
    assert "test accuracy" in out0
    assert out1 == ""
    assert json.load(open(root / "cli" / "distill-kd-0" / "result.json"))["processes"] == 2


# -- no processes needed ----------------------------------------------------------------------


def test_global_batch_must_divide_by_the_processes(tmp_path):
    ctx = DistContext(rank=0, world_size=3)
    with pytest.raises(
        ValueError,
        match=r"--batch-size 64 is the global batch and must divide by the 3 "
        r"processes.*use 63 or 66",
    ):
        ctx.check_batch(64)
    assert ctx.check_batch(63) == 21
    with pytest.raises(ValueError, match="must divide"):  # before any collective: no group exists
        run_distill(
            resolve_spec("kd"),
            None,
            None,
            "digits_student",
            [],
            _config(),
            str(tmp_path),
            dist=DistContext(rank=1, world_size=3),
        )


@pytest.mark.parametrize("n", [196, 197, 5])
def test_rank_shares_make_up_the_single_process_batches(n):
    """Step j's shares of 2 ranks (batch 64 -> 32 each) are the single-process batch j; with n odd
    the sampler pads the last one with the epoch's first sample."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    shares = []
    for r in range(2):
        s = EpochShardSampler(lambda e: order, n, 2, r)
        s.set_epoch(1)
        local = list(s)
        shares.append([local[i : i + 32] for i in range(0, len(local), 32)])
    single = [order[i : i + 64] for i in range(0, n, 64)]
    assert len(shares[0]) == len(shares[1]) == len(single)
    for j, batch in enumerate(single):
        got = sorted(shares[0][j] + shares[1][j])
        want = sorted(batch + (order[: (-n) % 2] if j == len(single) - 1 else []))
        assert got == want


def test_sampler_follows_the_epoch_order():
    data = load_data("digits", val_fraction=0.1, seed=0)
    cfg = _config()
    idx = stratified_subset(data.train.labels, cfg.subset, cfg.seed)
    s = EpochShardSampler(
        lambda e: _epoch_source(data, cfg, idx, e, None, None)[0].tolist(), len(idx), 2, 0
    )
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0  # a new order every epoch
    assert e0 == _epoch_source(data, cfg, idx, 0, None, None)[0].tolist()[0::2]


def test_torchrun_environment(monkeypatch):
    for k, v in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    ctx = DistContext.from_env("cuda")
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.backend, ctx.is_main) == (
        1,
        4,
        "cuda:1",
        "nccl",
        False,
    )
    assert DistContext.from_env("cpu").backend == "gloo"
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        DistContext.from_env("cuda:2")
    monkeypatch.delenv("RANK")
    assert not DistContext.from_env("cpu").distributed


@pytest.mark.parametrize("rank", [0, 1])
def test_cli_mistakes_under_torchrun(monkeypatch, tmp_path, rank):
    """Found before any process group exists; every rank exits 1, rank 0 alone says why."""
    for k, v in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}.items():
        monkeypatch.setenv(k, v)
    code, out = _cli(tmp_path, tmp_path / "teacher.pt", "--batch-size", "33")
    assert code == 1
    if rank == 0:
        assert "--batch-size 33 is the global batch and must divide by the 2 processes" in out
        assert "use 32 or 34" in out
    else:
        assert out == ""
    r = CliRunner().invoke(main, ["distill", "--spec", "kd", "--out", str(tmp_path)])
    assert r.exit_code == 1 and ("under torchrun the teacher must exist" in r.output) == (rank == 0)


def test_cpu_sync_batchnorm_without_a_group_is_batchnorm():
    """Conversion keeps parameters (the same tensors) and state-dict keys; with no process group
    the layer is plain BN in training and eval."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    ref[1].weight.data.uniform_(0.5, 1.5)
    conv = convert_sync_batchnorm(copy.deepcopy(ref), "cpu")
    assert isinstance(conv[1], GlooSyncBatchNorm)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(conv(x), ref(x))
    torch.testing.assert_close(conv[1].running_var, ref[1].running_var)
    conv.eval(), ref.eval()
    torch.testing.assert_close(conv(x), ref(x))
    with pytest.raises(RuntimeError, match="call DistContext.init"):
        DistContext(rank=0, world_size=2).wrap(conv)
