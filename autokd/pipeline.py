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
    precision: str = "fp32",
    channels_last: bool = False,
) -> TeacherInfo:
    """The teacher of a run: from ``checkpoint`` when given; else from ``train_to`` when that file
    exists (an earlier run trained it); else trained now and saved to ``train_to`` (with
    ``precision`` and ``channels_last``, autokd/train/precision.py)."""
    from autokd.models import build_model
    from autokd.store import teacher_hash
    from autokd.train.teacher import evaluate, load_checkpoint, save_checkpoint, train_classifier

    model = build_model(name, num_classes=data.num_classes, in_channels=data.channels)
    check_model_fits(model, name, data, "teacher")
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
        train_classifier(model, data, epochs=epochs, seed=seed, device=device, progress=progress,
                         precision=precision, channels_last=channels_last)
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


def check_model_fits(model: torch.nn.Module, name: str, data, role: str) -> None:
    """A forward pass of two training images through ``model`` (eval mode, no grad): images too
    small for the model (or of a layout it cannot take) fail here, before any training, with
    the model and the image size named instead of a traceback from deep inside a layer."""
    x = data.train.images[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        c, h, w = x.shape[1:]
        raise PipelineError(
            f"{role} {name} cannot take the {c}x{h}x{w} images of {data.spec} ({first}); use "
            "larger images or a model made for this size"
        ) from None
    finally:
        model.train(was_training)


def open_store(path: str, teacher: TeacherInfo, data, verify: str = "touch"):
    """The existing feature store at ``path``, checked to hold ``teacher``'s features of
    ``data``'s training split. Another teacher or other data is a PipelineError naming both
    that says the file is left as it is; damage is the store's own StoreError (it names the
    chunk or header check and says how to rebuild). ``verify``: see FeatureStore.open."""
    from autokd.store import FeatureStore, StoreError

    try:
        return FeatureStore.open(path, expect_teacher_hash=teacher.hash,
                                 expect_dataset_id=data.identity, verify=verify)
    except StoreError as e:
        check = getattr(e, "check", "")
        if check == "teacher hash":
            raise PipelineError(
                f"{path}: feature store of another teacher (it holds {e.found}, this run's "
                f"teacher is {e.expected}); left as it is: use another --out, or remove it to "
                "cache this teacher"
            ) from None
        if check == "data set id":
            raise PipelineError(
                f"{path}: feature store of other data or another --seed (it holds {e.found}, "
                f"this run has {e.expected}); left as it is: use another --out, or the same "
                "--data and --seed"
            ) from None
        raise


# StoreError checks that mean the file's bytes are damaged (not a store of something else).
_STORE_DAMAGE = ("header checksum", "truncated file", "file size", "data checksum")


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
    repair: bool = False,
):
    """The feature store of ``teacher`` on ``data``'s training split: opened and checked when it
    exists, built otherwise.

    A store of another teacher, of other data or with other views is refused by name and left
    as it is (it may be another run's). A damaged store is refused too, except with ``repair``
    (``autokd-cli cache``): then an existing store has every chunk checked now, and a damaged
    one is rebuilt (its bytes are worth nothing; the new file replaces it atomically)."""
    from autokd.store import StoreError

    if os.path.exists(path):
        try:
            store = open_store(path, teacher, data, verify="open" if repair else "touch")
        except StoreError as e:
            if repair and getattr(e, "check", "").startswith(_STORE_DAMAGE):
                log(f"feature store: {path} is damaged ({e.check}); rebuilding it")
                return _build_store(path, teacher, data, augment, views, dtype, batch_size, device,
                                    log, progress)
            raise
        if store.num_views != views:
            raise PipelineError(
                f"{path}: feature store has {store.num_views} views, this run asks for {views}; "
                "remove it or pass the same --views"
            )
        log(f"feature store: {path} ({store.num_samples} samples x {store.num_views} views"
            + (", every chunk checked)" if repair else ")"))
        return store
    return _build_store(path, teacher, data, augment, views, dtype, batch_size, device, log,
                        progress)


def _build_store(path, teacher, data, augment, views, dtype, batch_size, device, log, progress):
    from autokd.store import FeatureStore

    log(f"feature store: caching teacher features of {len(data.train)} samples x {views} views to {path}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return FeatureStore.build(
        path, teacher.model, data.train, taps=teacher.taps, views=views, dtype=dtype,
        batch_size=batch_size, augment=augment, dataset_id=data.identity, progress=progress, device=device,
    )


def make_augment(data, seed: int):
    """The replayable augmentation of a data set: crop with the padding teacher training uses
    (``autokd.data.augment.default_padding``: 1/8 of the shorter side), flip where the data
    allow it (not for digits, whose classes are not mirror-symmetric). A streamed folder
    (autokd.data.stream) gets the random-resized crop of its image size instead."""
    from autokd.data.augment import default_padding
    from autokd.store import ReplayAugment, ReplayResizedCrop

    if getattr(data.train, "streaming", False):
        return ReplayResizedCrop(seed=seed, size=data.image_size[0],
                                 flip=bool(getattr(data, "allow_flip", True)))

    pad = default_padding(tuple(data.image_size))
    return ReplayAugment(seed=seed, crop_padding=pad, flip=bool(getattr(data, "allow_flip", True)))
