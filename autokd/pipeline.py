"""The steps every command shares: data, teacher (loaded or trained), feature store.

``autokd-cli train-teacher``, ``cache``, ``search`` and ``distill`` are thin layers over these
functions, so that the defaults of one command are the defaults of all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from autokd.data import data_kind
from autokd.errors import PipelineError

Log = Callable[[str], None]


@dataclass
class TeacherInfo:
    model: torch.nn.Module
    name: str
    checkpoint: str
    taps: List[str]
    hash: str
    test_accuracy: Optional[float]


def default_models(data_name: str):
    """(teacher, student) model names that suit a data set when the user names none: its kind's
    entry in the data-set registry (autokd.data.DATASETS)."""
    kind = data_kind(data_name)
    return kind.teacher, kind.student


def default_training(data_name: str) -> dict:
    """Training schedule defaults (epochs of the full schedule, batch size, learning rate) of a
    data set: its kind's entry in the data-set registry (autokd.data.DATASETS, where the
    choices are explained)."""
    return data_kind(data_name).training()


def resolve_taps(model_name: str, taps: Optional[Sequence[str]]) -> List[str]:
    from autokd.models import default_taps

    if taps:
        return list(taps)
    return list(default_taps(model_name))


def load_or_train_teacher(
    data,
    name: str,
    checkpoint: Optional[str],
    train_to: Optional[str],
    epochs: int,
    seed: int = 0,
    device: str = "cpu",
    taps: Optional[Sequence[str]] = None,
    log: Log = print,
    progress: bool = True,
) -> TeacherInfo:
    """The teacher of a run: from ``checkpoint`` when given; else from ``train_to`` when that file
    exists (an earlier run trained it); else trained now and saved to ``train_to``."""
    from autokd.models import build_model
    from autokd.store import teacher_hash
    from autokd.train.teacher import evaluate, load_checkpoint, save_checkpoint, train_classifier

    model = build_model(name, num_classes=data.num_classes, in_channels=data.channels)
    path = checkpoint or train_to
    if checkpoint and not os.path.exists(checkpoint):
        raise PipelineError(f"teacher checkpoint {checkpoint} does not exist")
    acc = None
    if path and os.path.exists(path):
        state, meta = load_checkpoint(path, model)
        acc = (meta or {}).get("accuracy")
        log(f"teacher {name}: loaded {path}" + (f" (test accuracy {acc:.4f})" if acc is not None else ""))
    else:
        if not train_to:
            raise PipelineError("no teacher checkpoint given and nowhere to train one")
        log(f"teacher {name}: training for {epochs} epochs (first run; saved to {train_to})")
        torch.manual_seed(seed)
        train_classifier(model, data, epochs=epochs, seed=seed, device=device, progress=progress)
        acc, _ = evaluate(model, data.test, device=device)
        os.makedirs(os.path.dirname(os.path.abspath(train_to)), exist_ok=True)
        save_checkpoint(
            train_to, model,
            {"model": name, "num_classes": data.num_classes, "in_channels": data.channels,
             "data": data.identity, "accuracy": acc},
        )
        log(f"teacher {name}: test accuracy {acc:.4f}")
        path = train_to
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TeacherInfo(model, name, path, resolve_taps(name, taps), teacher_hash(model), acc)


def open_or_build_store(
    path: str,
    teacher: TeacherInfo,
    data,
    augment,
    views: int,
    dtype: str,
    batch_size: int = 256,
    device: str = "cpu",
    log: Log = print,
    progress: bool = True,
):
    """The feature store of ``teacher`` on ``data``'s training split: opened and checked when it
    exists, built otherwise. A store made by another teacher or from other data is an error."""
    from autokd.store import FeatureStore

    if os.path.exists(path):
        store = FeatureStore.open(path, expect_teacher_hash=teacher.hash, expect_dataset_id=data.identity)
        if store.num_views != views:
            raise PipelineError(
                f"{path}: feature store has {store.num_views} views, this run asks for {views}; "
                "remove it or pass the same --views"
            )
        log(f"feature store: {path} ({store.num_samples} samples x {store.num_views} views)")
        return store
    log(f"feature store: caching teacher features of {len(data.train)} samples x {views} views to {path}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return FeatureStore.build(
        path, teacher.model, data.train, taps=teacher.taps, views=views, dtype=dtype,
        batch_size=batch_size, augment=augment, dataset_id=data.identity, progress=progress, device=device,
    )


def make_augment(data, seed: int):
    """The replayable augmentation of a data set: crop with the padding teacher training uses
    (``autokd.data.augment.default_padding``: 1/8 of the shorter side), flip where the data
    allow it (not for digits, whose classes are not mirror-symmetric)."""
    from autokd.data.augment import default_padding
    from autokd.store import ReplayAugment

    pad = default_padding(tuple(data.image_size))
    return ReplayAugment(seed=seed, crop_padding=pad, flip=bool(getattr(data, "allow_flip", True)))
