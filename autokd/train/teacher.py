"""Plain supervised training of a classifier (teachers, and students trained alone), its
evaluation, and checkpoints.

Recipe (the CIFAR standard of the distillation literature): SGD with Nesterov momentum 0.9,
weight decay 5e-4, cosine learning rate per step from ``lr`` to 0, cross-entropy; augmentation
is a random crop with zero padding of 1/8 of the side and, for natural images, a horizontal flip.
The whole data set sits in tensors on the training device and batches are gathered by index:
on small images this is much faster than a DataLoader.

Checkpoints are ``torch.save`` of ``{"autokd_checkpoint": 1, "state_dict": ..., "meta": ...}``
and are read back with ``torch.load(weights_only=True)``, so loading one never runs code.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from autokd.data.augment import (
    ReplayResizedCrop,
    apply_augmentation,
    default_padding,
    sample_augmentation,
)
from autokd.models import build_model
from autokd.train import precision as amp

__all__ = [
    "train_classifier",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "train_and_save",
    "resolve_device",
]

CHECKPOINT_VERSION = 1


def resolve_device(device: Optional[Any] = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, batch_size: int = 512, device: Optional[Any] = None
) -> Tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` in eval mode on ``dataset``.

    ``dataset`` is an ``ImageTensorDataset`` (fast path through its tensors) or any dataset of
    (image, label) pairs. The model's training mode is restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    dev = resolve_device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    try:
        for x, y in _batches(dataset, batch_size):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += y.shape[0]
    finally:
        model.train(was_training)
    return correct / n, loss_sum / n


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(dataset, batch_size: int):
    if getattr(dataset, "streaming", False):  # a streamed folder: DataLoader workers decode
        n = len(dataset)
        batches = [torch.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
        stream = dataset.loader(None)
        try:
            yield from stream.batches(batches, 0)
        finally:
            stream.close()
    elif hasattr(dataset, "images") and hasattr(dataset, "labels"):
        for i in range(0, len(dataset), batch_size):
            yield dataset.images[i : i + batch_size], dataset.labels[i : i + batch_size]
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for x, y in loader:
            yield x, torch.as_tensor(y)


def train_classifier(
    model: nn.Module,
    data,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    seed: int = 0,
    device: Optional[Any] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> List[Dict[str, float]]:
    """Train ``model`` on ``data.train`` (a ``DataBundle``); returns one dict per epoch with
    ``epoch, lr, train_loss, train_acc, val_loss, val_acc, seconds`` (val_* are NaN when the
    bundle has no validation split). ``seed`` fixes the batch order and the augmentation (not
    the initial weights: seed torch before building the model). The model is left on ``device``
    in eval mode. ``precision`` and ``channels_last``: see autokd/train/precision.py (the
    forward under autocast, the loss in float32, a GradScaler for fp16)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"train_classifier: expected epochs >= 1, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"train_classifier: expected batch_size >= 1, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"train_classifier: expected lr > 0, got {lr!r}")
    dev = resolve_device(device)
    amp.check_precision(precision, dev)
    scaler = amp.grad_scaler(precision, dev)
    model.to(dev)
    flip = bool(getattr(data, "allow_flip", True))
    stream = None
    if getattr(data.train, "streaming", False):
        # a streamed folder (autokd.data.stream): DataLoader workers decode random-resized
        # crops, view = epoch, from another seed than the feature store's views
        crop = (
            ReplayResizedCrop(
                seed=(int(seed) * 1_000_003 + 7) % 2**64, size=data.train.size, flip=flip
            )
            if augment
            else None
        )
        stream = data.train.loader(crop, device=dev)
        n = len(data.train)
    else:
        images = data.train.images.to(dev)  # [N, C, H, W]
        labels = data.train.labels.to(dev)  # [N]
        n = labels.shape[0]
        pad = default_padding(tuple(images.shape[-2:]))
    if n == 0:
        raise ValueError("train_classifier: the training split is empty")
    # BatchNorm cannot train on a batch of one; such a remainder is dropped.
    steps_per_epoch = n // batch_size + (1 if n % batch_size > 1 else 0) if n > 1 else 1
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
    )
    gen = torch.Generator().manual_seed(int(seed))
    history: List[Dict[str, float]] = []
    bar = _progress(epochs, progress)
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=gen)
            batches = [order[b * batch_size : (b + 1) * batch_size] for b in range(steps_per_epoch)]
            if stream is not None:
                source = stream.batches(batches, epoch)
            else:
                crops = sample_augmentation(n, pad, flip, gen) if augment else None
                source = _memory_batches(images, labels, batches, crops, pad)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.int64)
            seen = 0
            for x, y in source:
                for g in opt.param_groups:
                    g["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))
                with amp.autocast(precision, dev):
                    logits = model(amp.memory_format(x, channels_last))
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                amp.backward_step(loss, opt, scaler)
                step += 1
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
            train_loss = float(loss_sum) / seen
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"train_classifier: the training loss became {train_loss} in epoch {epoch}; "
                    f"lower the learning rate (now {lr})"
                )
            row = {
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": train_loss,
                "train_acc": int(correct) / seen,
            }
            if len(data.val) > 0:
                row["val_acc"], row["val_loss"] = evaluate(model, data.val, device=dev)
            else:
                row["val_acc"] = row["val_loss"] = float("nan")
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            msg = (
                f"epoch {epoch}/{epochs}  loss {train_loss:.4f}  "
                f"train acc {row['train_acc']:.4f}"
                f"  val acc {row['val_acc']:.4f}  {row['seconds']:.1f}s"
            )
            if bar is not None:
                bar.set_postfix_str(f"loss {train_loss:.3f} val {row['val_acc']:.3f}")
                bar.update(1)
            if log is not None:
                log(msg)
    finally:
        if bar is not None:
            bar.close()
        if stream is not None:
            stream.close()
    model.eval()
    return history


def _memory_batches(images, labels, batches, crops, pad: int):
    """(images, labels) of each batch of ids from tensors on the training device, cropped and
    flipped with ``crops`` = (offsets, flips) of every sample when given."""
    dev = images.device
    for idx in batches:
        x = images[idx.to(dev)]
        if crops is not None:
            x = apply_augmentation(x, crops[0][idx], crops[1][idx], pad)
        yield x, labels[idx.to(dev)]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # only when a progress bar is asked for

    return tqdm(total=total, desc="train", unit="epoch", leave=False)


# ------------------------------------------------------------------------------ checkpoints

_PLAIN = (str, int, float, bool, type(None))


def _check_meta(value: Any, where: str = "meta") -> None:
    # weights_only loading accepts plain containers of plain values (and tensors) only.
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"save_checkpoint: expected string keys in {where}, got {k!r}")
            _check_meta(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"save_checkpoint: {where} is a {type(value).__name__}; expected str, int, "
        f"float, bool, None, lists and dicts of them"
    )


def save_checkpoint(path: str, model: nn.Module, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Save ``model``'s state and ``meta`` (e.g. model name, num_classes, in_channels, data
    identity, accuracy) atomically: a crash never leaves a half-written file at ``path``."""
    meta = dict(meta or {})
    _check_meta(meta)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"autokd_checkpoint": CHECKPOINT_VERSION, "state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)


def _extract_state(obj: Any, path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if isinstance(obj, Mapping) and "autokd_checkpoint" in obj:
        return dict(obj["state_dict"]), dict(obj.get("meta") or {})
    if isinstance(obj, Mapping):
        # Checkpoints of other trainers: {"state_dict": ...}, {"model": ...} or a bare state dict.
        for key in ("state_dict", "model", "model_state_dict", "net"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return dict(inner), {}
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), {}
    raise ValueError(
        f"checkpoint {path!r}: expected a state dict (or a dict holding one under "
        f"'state_dict' or 'model'), got {type(obj).__name__}"
        + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else "")
    )


def _summarise(keys: List[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_into(
    model: nn.Module, state: Dict[str, torch.Tensor], meta: Dict[str, Any], path: str
) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {list(state[k].shape)}, model {list(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        saved = f" (saved from model {meta['model']!r})" if meta.get("model") else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_summarise(mismatched, 3)})")
        raise ValueError(
            f"checkpoint {path!r}{saved} does not fit the given "
            f"{type(model).__name__}: {'; '.join(parts)}"
        )
    model.load_state_dict(state)


def load_checkpoint(
    path: str, model: Optional[nn.Module] = None, map_location: Any = "cpu"
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; returns (state_dict, meta).

    With ``model``, the state is loaded into it; a checkpoint of another architecture raises a
    ValueError that summarises missing keys, unexpected keys and shape mismatches.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"checkpoint {path!r}: cannot be read with torch.load(weights_only=True) "
            f"({type(e).__name__}: {first_line})"
        ) from None
    state, meta = _extract_state(obj, path)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    # A model trained into divergence loads without complaint and then fails every trial that
    # uses it (NaN features, NaN rewards): refuse it here, by name.
    bad = sorted(
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if bad:
        raise ValueError(
            f"checkpoint {path!r}: {len(bad)} of {len(state)} tensors hold NaN or "
            f"Inf ({_summarise(bad)}); expected finite weights. Train the model "
            "again (autokd-cli train-teacher) or give another checkpoint"
        )
    if model is not None:
        _load_into(model, state, meta, path)
    return state, meta


def load_model(path: str, map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from (meta needs ``model``, ``num_classes`` and
    ``in_channels``) and load its weights; returns (model in eval mode, meta)."""
    state, meta = load_checkpoint(path, map_location=map_location)
    missing = [k for k in ("model", "num_classes", "in_channels") if k not in meta]
    if missing:
        raise ValueError(
            f"checkpoint {path!r}: its meta lacks {', '.join(missing)}; build the "
            f"model yourself and call load_checkpoint(path, model)"
        )
    model = build_model(
        meta["model"], num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"])
    )
    _load_into(model, state, meta, path)
    return model.eval(), meta


def train_and_save(
    model_name: str,
    data,
    epochs: int,
    path: str,
    seed: int = 0,
    device: Optional[Any] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    **train_kwargs: Any,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build ``model_name`` for ``data`` (seeded), train it with ``train_classifier``, measure
    it on the test split and save a checkpoint whose meta ``load_model`` can rebuild from.
    Returns (model in eval mode, meta)."""
    torch.manual_seed(int(seed))
    model = build_model(model_name, num_classes=data.num_classes, in_channels=data.channels)
    t0 = time.perf_counter()
    history = train_classifier(
        model, data, epochs, seed=seed, device=device, progress=progress, log=log, **train_kwargs
    )
    seconds = time.perf_counter() - t0
    test_acc, test_ce = evaluate(model, data.test)
    meta = {
        "model": model_name,
        "num_classes": int(data.num_classes),
        "in_channels": int(data.channels),
        "data": data.identity,
        "accuracy": test_acc,
        "test_ce": test_ce,
        "val_accuracy": history[-1]["val_acc"],
        "epochs": int(epochs),
        "seed": int(seed),
        "train_seconds": seconds,
    }
    save_checkpoint(path, model, meta)
    return model, meta
