"""Student training with a distiller spec: the one loop behind proxy trials and `distill`.

A proxy trial is this loop with the paper's accelerations switched on (offline teacher
features, sparse student, data subset, early stop); `autokd-cli distill` is the same loop with
them off (or on, where asked). Keeping one loop means a proxy ranks designs by the same
training that later uses them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autokd.nn.taps import FeatureTaps
from autokd.train import precision as amp
from autokd.train import rng
from autokd.train.distributed import EpochShardSampler
from autokd.train.precision import PRECISIONS
from autokd.train.sparse import EXCLUDE_KEYS, make_optimizer

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    epochs: int = 30  # the full schedule; early stop trains a fraction of it
    batch_size: int = 64
    lr: float = 0.05  # the peak: after the warm-up, then cosine to 0
    momentum: float = 0.9  # SGD (Nesterov) only
    weight_decay: float = 5e-4
    # "sgd" (Nesterov) or "adamw" (betas 0.9, 0.999; no decay on biases, norms and the
    # parameters the model's no_weight_decay() names, as timm); both fused and masked under
    # sparsity (autokd.train.sparse.make_optimizer). autokd.models.training_defaults(name) gives
    # a model's defaults: ViTs train with adamw.
    optimizer: str = "sgd"
    # linear warm-up from 0 to lr over this many epochs of the full schedule, then cosine; an
    # early-stopped proxy compresses both alike (the warm-up is warmup_epochs / epochs of the
    # steps it trains)
    warmup_epochs: float = 0.0
    # The student's share of the training split: a stratified cut, the same for every seed and
    # every run (seeded by DATA_FRACTION_SEED), for a teacher trained on the whole split that
    # distils into a student with fewer labelled images (the embedded digits task). The
    # proxy's subset is taken within it.
    data_fraction: float = 1.0
    subset: float = 1.0  # fraction of the student's data used (stratified, fixed per seed)
    stop_fraction: float = 1.0  # early stop: train ceil(epochs * stop_fraction) epochs
    sparsity: float = 0.0  # fraction of student weights forced to zero (0 = dense)
    offline: bool = True  # teacher features from the feature store instead of the teacher
    seed: int = 0  # initialisation, batch order, sparsity masks
    subset_seed: Optional[int] = (
        None  # which subset; None: `seed`. A search fixes it for all trials
    )
    device: str = "cpu"
    # autokd/train/precision.py: fp32 | bf16 (autocast) | fp16 (autocast + GradScaler); losses
    # stay float32 either way. channels_last: input batches in NHWC strides.
    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "> 0"),
            ("data_fraction", 0 < self.data_fraction <= 1, "in (0, 1]"),
            ("subset", 0 < self.subset <= 1, "in (0, 1]"),
            ("stop_fraction", 0 < self.stop_fraction <= 1, "in (0, 1]"),
            ("sparsity", 0 <= self.sparsity < 1, "in [0, 1)"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            (
                "warmup_epochs",
                0 <= self.warmup_epochs < self.epochs,
                f"in [0, epochs = {self.epochs})",
            ),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("channels_last", isinstance(self.channels_last, bool), "a bool"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(
                    f"train config: expected {name} {want}, got {getattr(self, name)!r}"
                )

    @property
    def run_epochs(self) -> int:
        return max(1, math.ceil(self.epochs * self.stop_fraction))

    def to_dict(self):
        return asdict(self)

    def pinned(self) -> dict:
        """What a resumed run must share with the run it resumes (a search's journal, a
        distill checkpoint): every field but the device; precision and channels_last only when
        they are not the defaults, so that journals and checkpoints written before these
        options existed (fp32, contiguous) still resume."""
        out = {k: v for k, v in self.to_dict().items() if k != "device"}
        for k, default in (("precision", "fp32"), ("channels_last", False)):
            if out[k] == default:
                del out[k]
        return out


#: The seed of the student's data cut (TrainConfig.data_fraction): part of the task's
#: definition, like a data set's test split, not of a run.
DATA_FRACTION_SEED = 20240607


def student_indices(labels: torch.Tensor, cfg: "TrainConfig") -> torch.Tensor:
    """The training-split indices a run trains on: the data_fraction cut, then the proxy's
    subset of it (seeded by subset_seed, else the run's seed)."""
    cut = stratified_subset(labels, cfg.data_fraction, DATA_FRACTION_SEED)
    seed = cfg.seed if cfg.subset_seed is None else cfg.subset_seed
    return cut[stratified_subset(labels[cut], cfg.subset, seed)]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random subset (at least one sample per class present)."""
    if fraction >= 1:
        return torch.arange(len(labels))
    g = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    keep: List[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = max(1, int(round(len(idx) * fraction)))
        keep.append(g.choice(idx, size=n, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(keep))).long()


@torch.no_grad()
def forward_all(
    model: nn.Module,
    images: torch.Tensor,
    taps: Sequence[str] = (),
    batch_size: int = 512,
    device: str = "cpu",
):
    """Logits [N, K] and tap features {tap: [N, ...]} of ``model`` on ``images`` (eval mode)."""
    was_training = model.training
    model.eval()
    hooks = FeatureTaps(model, taps, "forward_all") if taps else None
    logits, feats = [], {t: [] for t in taps}
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            logits.append(model(x).float().cpu())
            for t in taps:
                feats[t].append(hooks.outputs[t].float().cpu())
    finally:
        if hooks:
            hooks.remove()
        model.train(was_training)
    return torch.cat(logits), {t: torch.cat(v) for t, v in feats.items()}


def cosine_lr(base: float, step: int, total: int, warmup: int = 0) -> float:
    """lr at ``step`` of ``total``: linear from base/warmup to base over the first ``warmup``
    steps, then cosine from base to 0 over the rest (plain cosine when warmup is 0)."""
    if step < warmup:
        return base * (step + 1) / warmup
    step, total = step - warmup, total - warmup
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _embeddings(model: nn.Module):
    """Parameters the model's ``no_weight_decay()`` names (timm's convention: position
    embeddings, class and distillation tokens), as far as the model has them."""
    named = getattr(model, "no_weight_decay", None)
    skip = set(named()) if callable(named) else set()
    return {n for n, _ in model.named_parameters() if n in skip}


def _no_decay(model: nn.Module):
    """Names of the parameters AdamW should not decay: biases, norm weights (every parameter
    with fewer than 2 dims) and the embeddings ``no_weight_decay()`` names."""
    return {n for n, p in model.named_parameters() if p.dim() < 2} | _embeddings(model)


@dataclass
class TrainResult:
    epochs_run: int
    steps: int
    seconds: float
    final_loss: float
    history: List[Dict[str, float]] = field(default_factory=list)


def _resident(split, device: torch.device):
    """(images, labels) of an in-memory split, on ``device`` when that is a GPU with room.

    On CUDA the split is copied to the device once (kept on the split object, so every trial
    of a worker shares one copy) and batches are gathered and augmented there: no host-side
    gather, no host-to-device copy per step. CIFAR's training split is 0.6 GB in float32; a
    split larger than a quarter of the free device memory stays on the host."""
    images, labels = split.images, split.labels
    if device.type != "cuda" or not isinstance(images, torch.Tensor):
        return images, labels
    cache = getattr(split, "_autokd_on_device", None)
    key = str(device)
    if cache is None or cache[0] != key:
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() * images.element_size() > free // 4:
            return images, labels
        cache = (key, images.to(device), labels.to(device))
        split._autokd_on_device = cache
    return cache[1], cache[2]


def _epoch_plan(
    data, cfg: TrainConfig, indices: torch.Tensor, epoch: int, store, augment, features: bool = True
):
    """(order, view, read_images, read_teacher) of one epoch: the sample ids in batch order, the
    augmentation view the epoch reads, ids -> (images, labels) from an in-memory split, and
    ids -> (teacher_features, teacher_logits), both None without a store or ``features``.

    With a store (offline) the epoch reads view ``epoch % K`` in the store's own order
    (``FeatureStore.batches``), images augmented exactly as stored; ``features=False`` (a
    design without a teacher term) keeps that order and those images but reads nothing from
    the store. Without a store the view is the epoch. Teacher records are gathered into pinned
    memory on CUDA, so their copy to the device (non_blocking in the loop) overlaps the step;
    the pinned blocks are torch's cached host allocations, reused only after their copy has
    finished."""
    device = torch.device(cfg.device)
    images, labels = _resident(data.train, device)

    def no_teacher(idx):
        return None, None

    if cfg.offline and store is not None:
        sb = store.batches(
            data.train,
            augment,
            batch_size=cfg.batch_size,
            indices=indices,
            epoch=epoch,
            shuffle=True,
            seed=cfg.seed,
        )
        view, pin = sb.view, device.type == "cuda"

        def read_images(idx):
            # what StoreBatches.batch gives, gathered from the (resident) tensors in one index
            x = augment.apply_batch(images[idx.to(images.device)], idx, view)
            return x, labels[idx.to(labels.device)]

        def read_teacher(idx):
            ids = idx.numpy()
            if hasattr(store, "stores"):  # several teachers (autokd.store.TeacherStores)
                feats = [s.gather(ids, view, pin_memory=pin) for s in store.stores]
                return feats, [f.pop("logits", None) for f in feats]
            teacher = store.gather(ids, view, pin_memory=pin)
            return teacher, teacher.pop("logits", None)

        return (
            torch.from_numpy(sb.order()),
            view,
            read_images,
            read_teacher if features else no_teacher,
        )
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = indices[torch.randperm(len(indices), generator=g)]

    def from_memory(idx):
        x = images[idx.to(images.device)]
        if augment is not None:
            x = augment.apply_batch(x, idx, torch.full_like(idx, epoch))
        return x, labels[idx.to(labels.device)]

    return order, epoch, from_memory, no_teacher


def _teacher_on(device, tf, tl):
    """Stored teacher features and logits on ``device`` in float32: one teacher's dict and
    tensor, or (several teachers) a list of each, one entry per teacher."""
    if isinstance(tf, list):
        moved = [_teacher_on(device, f, t) for f, t in zip(tf, tl)]
        return [f for f, _ in moved], [t for _, t in moved]
    tf = {k: v.to(device, non_blocking=True).float() for k, v in tf.items()}
    return tf, (tl.to(device, non_blocking=True).float() if tl is not None else None)


def _epoch_source(
    data, cfg: TrainConfig, indices: torch.Tensor, epoch: int, store, augment, features: bool = True
):
    """(order, make_batch) of one epoch: the sample ids in batch order, and the function that
    turns ids into (images, labels, teacher_features or None, teacher_logits or None); see
    ``_epoch_plan``."""
    order, _, read_images, read_teacher = _epoch_plan(
        data, cfg, indices, epoch, store, augment, features
    )
    return order, lambda idx: (*read_images(idx), *read_teacher(idx))


def _epoch_batches(
    data,
    cfg: TrainConfig,
    indices: torch.Tensor,
    epoch: int,
    store,
    augment,
    sampler=None,
    features: bool = True,
    stream=None,
):
    """Yield (images, labels, teacher_features or None, teacher_logits or None) for one epoch:
    batches of ``cfg.batch_size`` in the epoch's order, or, with a data-parallel ``sampler``
    (``EpochShardSampler`` over that order), this rank's share of each of those batches.
    ``stream``: the StreamLoader of a streamed split (autokd.data.stream), whose worker
    processes decode and crop the images of those batches ahead of the step."""
    order, view, read_images, read_teacher = _epoch_plan(
        data, cfg, indices, epoch, store, augment, features
    )
    if sampler is None:
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    else:
        sampler.set_epoch(epoch)
        local = torch.as_tensor(list(sampler), dtype=torch.long)
        per_rank = cfg.batch_size // sampler.num_replicas
        batches = [local[i : i + per_rank] for i in range(0, len(local), per_rank)]
    if stream is None:
        for idx in batches:
            yield (*read_images(idx), *read_teacher(idx))
        return
    for idx, (x, y) in zip(batches, stream.batches(batches, view)):
        yield (x, y, *read_teacher(idx))


def train_student(
    distiller,
    student: nn.Module,
    data,
    cfg: TrainConfig,
    store=None,
    augment=None,
    progress: Optional[Callable[[int, int, float], None]] = None,
    start_epoch: int = 0,
    resume: Optional[dict] = None,
    on_epoch_end: Optional[Callable[[int, object, object], None]] = None,
    dist=None,
) -> TrainResult:
    """Train ``student`` (inside ``distiller``) with CE + the distiller's KD loss.

    ``distiller`` is an ``autokd.distill.Distiller`` over ``student``; its adapters are trained
    too. ``resume`` ({"distiller", "optimizer", "sparsity"} state dicts and "rng", the RNG
    states of ``autokd.train.rng.capture_all``, as ``on_epoch_end``'s caller saved them)
    continues a run at ``start_epoch``. Offline (``cfg.offline`` and a
    ``store``), teacher features come from the store with
    exactly the stored augmentation; online, the distiller runs its teacher. Raises ``Diverged``
    when the loss stops being finite. ``on_epoch_end(epoch, optimizer, sparsity)`` is where
    ``distill`` writes checkpoints (with ``scaler=`` the GradScaler of an fp16 run, whose state
    ``resume["scaler"]`` restores).

    ``dist`` (an ``autokd.train.distributed.DistContext`` with a process group) trains data
    parallel: ``cfg.batch_size`` is the global batch, each rank takes its share of every batch
    and the distiller runs in DistributedDataParallel; see autokd/train/distributed.py. The
    caller converts BN layers (``convert_sync_batchnorm``) before building the distiller.
    Losses reported (history, ``final_loss``) are global means.
    """
    device = torch.device(cfg.device)
    amp.check_precision(cfg.precision, device)
    student_params = list(student.parameters())
    seen = {id(p) for p in student_params}
    extra = [p for p in distiller.parameters() if id(p) not in seen and p.requires_grad]
    indices = student_indices(data.train.labels, cfg)
    steps_per_epoch = math.ceil(len(indices) / cfg.batch_size)
    total_steps = cfg.run_epochs * steps_per_epoch
    warmup_steps = round(total_steps * cfg.warmup_epochs / cfg.epochs)
    # Sparsity applies to the student's weights; the distiller's adapters stay dense (they are
    # not part of the student that is kept).
    sparsity_kwargs = {"seed": cfg.seed}
    if _embeddings(student):
        # position embeddings and class tokens are not connections: never prune them
        sparsity_kwargs["exclude"] = EXCLUDE_KEYS + tuple(sorted(_embeddings(student)))
    if cfg.optimizer == "sgd":
        optim_kwargs = {"momentum": cfg.momentum, "nesterov": True}
    else:
        optim_kwargs = {"no_decay": _no_decay(student)}
    optimizer, sparsity = make_optimizer(
        student,
        kind=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        sparsity=cfg.sparsity,
        sparsity_kwargs=sparsity_kwargs,
        total_steps=total_steps,
        **optim_kwargs,
    )
    if extra:
        optimizer.add_param_group({"params": extra})
    if resume is not None:
        # Order matters: creating the sparsity manager zeroed the weights under a fresh mask, so
        # masks first, then the weights, then the optimizer's state.
        if sparsity is not None and resume.get("sparsity") is not None:
            sparsity.load_state_dict(resume["sparsity"])
        distiller.load_state_dict(resume["distiller"])
        optimizer.load_state_dict(resume["optimizer"])
    scaler = amp.grad_scaler(cfg.precision, device)
    if scaler is not None and resume is not None and resume.get("scaler") is not None:
        scaler.load_state_dict(resume["scaler"])
    distributed = dist is not None and dist.distributed
    sampler = None
    model = distiller
    if distributed:
        dist.check_batch(cfg.batch_size)
        sampler = EpochShardSampler(
            lambda e: _epoch_source(data, cfg, indices, e, store, augment)[0],
            len(indices),
            dist.world_size,
            dist.rank,
        )
        model = dist.wrap(distiller)
        dist.reseed(cfg.seed)
    if resume is not None and resume.get("rng") is not None:
        # last, after reseed: the resumed epochs draw what the uninterrupted run drew
        rng.restore_mine(resume["rng"], distiller, cfg.device, dist)
    # a design without a teacher term (the student alone) reads no teacher record
    spec = getattr(distiller, "spec", None)
    uses_teacher = spec is None or spec.uses_teacher()
    step = start_epoch * steps_per_epoch
    history: List[Dict[str, float]] = []
    t0 = time.perf_counter()
    loss_value = float("nan")
    distiller.train()
    # a streamed folder: one persistent DataLoader (its worker processes) for every epoch
    stream = (
        data.train.loader(augment, device=device)
        if getattr(data.train, "streaming", False)
        else None
    )
    try:
        for epoch in range(start_epoch, cfg.run_epochs):
            total, count = 0.0, 0
            for x, y, tf, tl in _epoch_batches(
                data,
                cfg,
                indices,
                epoch,
                store,
                augment,
                sampler,
                features=uses_teacher,
                stream=stream,
            ):
                lr = cosine_lr(cfg.lr, step, total_steps, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                distiller.set_progress(step / max(total_steps, 1))
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x = amp.memory_format(x, cfg.channels_last)
                if tf is not None:
                    tf, tl = _teacher_on(device, tf, tl)
                with amp.autocast(cfg.precision, device):
                    out = model(x, teacher_features=tf, teacher_logits=tl, labels=y)
                # float32 whatever the precision: the distiller returns its loss in float32
                loss = F.cross_entropy(out.student_logits.float(), y) + out.loss_kd
                if distributed:
                    # equal shares, so the mean of the rank means is the global batch mean; every
                    # rank sees the same value and stops together when it is not finite
                    loss_value = dist.all_sum([float(loss.detach())])[0] / dist.world_size
                else:
                    loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise Diverged(f"loss became {loss_value} at epoch {epoch}, step {step}")
                optimizer.zero_grad(set_to_none=True)
                stepped = amp.backward_step(loss, optimizer, scaler)
                # a step the fp16 scaler skipped (overflowing gradients) moves no weight; the
                # topology update waits for a step with finite gradients
                if sparsity is not None and stepped:
                    sparsity.step(step)
                step += 1
                total += loss_value * len(y)
                count += len(y)
            history.append({"epoch": epoch, "loss": total / max(count, 1), "lr": lr})
            if progress is not None:
                progress(epoch + 1, cfg.run_epochs, total / max(count, 1))
            if on_epoch_end is not None:
                if scaler is None:
                    on_epoch_end(epoch, optimizer, sparsity)
                else:  # its scale is state a resumed fp16 run needs
                    on_epoch_end(epoch, optimizer, sparsity, scaler=scaler)
    finally:
        if stream is not None:
            stream.close()
    return TrainResult(
        cfg.run_epochs - start_epoch, step, time.perf_counter() - t0, loss_value, history
    )
