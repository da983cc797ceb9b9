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
from autokd.data.augment import default_padding
from autokd.errors import PipelineError
from autokd.models import build_model, check_model_fits, default_taps, is_transformer
from autokd.nn.taps import find_module
from autokd.store import (
    FeatureStore,
    ReplayAugment,
    ReplayResizedCrop,
    StoreError,
    TeacherStores,
    teacher_hash,
)
from autokd.train.teacher import evaluate, load_checkpoint, save_checkpoint, train_classifier

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


def default_proxy(data_name: str, student: Optional[str] = None) -> dict:
    """A search's proxy-trial settings on a data set (subset, stop_fraction, sparsity) for a
    student (None: the data set's default student): its kind's entry in the data-set registry,
    which may give transformer students a longer trial."""
    student = student or default_models(data_name)[1]
    return data_kind(data_name).proxy(transformer=is_transformer(student))


def resolve_taps(model_name: str, taps: Optional[Sequence[str]]) -> List[str]:
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
    label: Optional[str] = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> TeacherInfo:
    """The teacher of a run: from ``checkpoint`` when given; else from ``train_to`` when that file
    exists (an earlier run trained it); else trained now and saved to ``train_to`` (with
    ``precision`` and ``channels_last``, autokd/train/precision.py). ``label``: how log lines
    name it (default ``teacher NAME``; several teachers number themselves)."""
    # seeded before the model is built: its initial weights are part of what the seed fixes
    # (a teacher trained twice from the same command is the same teacher)
    torch.manual_seed(seed)
    model = build_model(name, num_classes=data.num_classes, in_channels=data.channels)
    check_model_fits(model, name, data, "teacher")
    path = checkpoint or train_to
    if checkpoint and not os.path.exists(checkpoint):
        raise PipelineError(f"teacher checkpoint {checkpoint} does not exist")
    acc = None
    who = label or f"teacher {name}"
    if path and os.path.exists(path):
        state, meta = load_checkpoint(path, model)
        acc = (meta or {}).get("accuracy")
        log(f"{who}: loaded {path}" + (f" (test accuracy {acc:.4f})" if acc is not None else ""))
    else:
        if not train_to:
            raise PipelineError("no teacher checkpoint given and nowhere to train one")
        log(f"{who}: training for {epochs} epochs (first run; saved to {train_to})")
        torch.manual_seed(seed)
        train_classifier(
            model,
            data,
            epochs=epochs,
            seed=seed,
            device=device,
            progress=progress,
            precision=precision,
            channels_last=channels_last,
        )
        acc, _ = evaluate(model, data.test, device=device)
        os.makedirs(os.path.dirname(os.path.abspath(train_to)), exist_ok=True)
        save_checkpoint(
            train_to,
            model,
            {
                "model": name,
                "num_classes": data.num_classes,
                "in_channels": data.channels,
                "data": data.identity,
                "accuracy": acc,
            },
        )
        log(f"{who}: test accuracy {acc:.4f}")
        path = train_to
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TeacherInfo(model, name, path, resolve_taps(name, taps), teacher_hash(model), acc)


# -- several teachers ---------------------------------------------------------------------------
#
# Every command takes a list of teachers (``--teacher a,b``); one teacher is the list of one and
# keeps every file name, seed and pinned key it always had. Teacher j (counting from 0) has:
#   checkpoint  the j-th ``--teacher-checkpoint`` entry; an empty entry (``a.pt,``) or no option
#               means the run's own file ``teacher_file(<out>/teacher.pt, j)`` (teacher.pt,
#               teacher-1.pt, ...), trained on the first run with seed ``seed + j``: two teachers
#               of one architecture are then two different models (an ensemble, not a copy).
#   taps        its own list (``--teacher-taps "a1,a2;b1,b2"``), or one list shared by every
#               teacher (``"t1,t2"``: architectures with the same module paths), or, for an empty
#               entry or no option, the zoo's default taps of its architecture.
#   store       ``teacher_file(<out>/teacher_features.akds, j)``: one feature store per teacher
#               (see ``open_or_build_stores`` for why).
# Several teachers are combined by the Distiller: feature pairs (student tap i, teacher j tap i)
# for every j, weighted by the design's layer weighting (train-free mu_q by default); the logit
# term is the mean of the per-teacher logit distances (autokd.nn.blocks.DistillLoss).


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher of a run's list, as the user gave it (see the comment above)."""

    name: str
    checkpoint: Optional[str]  # None: the run's own file
    taps: Optional[List[str]]  # None: the zoo's default


def teacher_file(base: str, j: int) -> str:
    """Teacher j's file of a run: ``base`` itself for the first (a one-teacher run's very file),
    ``<stem>-<j><ext>`` for the others (teacher.pt, teacher-1.pt; teacher_features.akds,
    teacher_features-1.akds)."""
    if j == 0:
        return base
    stem, ext = os.path.splitext(base)
    return f"{stem}-{j}{ext}"


def _entries(value) -> List[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (entries stripped, empty ones kept as "")."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return ["" if v is None else str(v).strip() for v in value]


def teacher_plan(names, checkpoints=None, taps=None) -> List[TeacherEntry]:
    """The teachers of a run from ``names`` (``"a,b"`` or a list), ``checkpoints`` (None, or one
    entry per teacher, ``"a.pt,b.pt"`` or a list, an empty entry for the run's own file) and
    ``taps`` (None; one list of tap paths shared by every teacher; or one list, or None, per
    teacher). Lists of different lengths are a PipelineError naming both."""
    listed = _entries(names)
    if not listed or any(not n for n in listed):
        raise PipelineError(
            f"--teacher {names!r}: expected model names separated by commas, got an empty entry"
        )
    n = len(listed)
    described = f"{n} teacher{'s' if n > 1 else ''}: {', '.join(listed)}"
    cks: List[Optional[str]] = [None] * n
    if checkpoints is not None and checkpoints != "":
        # a file whose name holds a comma is one checkpoint, as it always was for one teacher
        whole = isinstance(checkpoints, str) and os.path.isfile(checkpoints)
        given = [checkpoints] if whole else _entries(checkpoints)
        if len(given) != n:
            raise PipelineError(
                f"expected one --teacher-checkpoint per --teacher ({described}), got "
                f"{len(given)} ({', '.join(repr(c) for c in given)}); leave an entry empty "
                "(a.pt,) to use or train that teacher in --out"
            )
        cks = [c or None for c in given]
    per_teacher: List[Optional[List[str]]] = [None] * n
    if taps:
        if isinstance(taps, str):
            raise PipelineError(
                f"teacher taps: expected a list of module paths (or one list per "
                f"teacher), got the string {taps!r}"
            )
        if all(t is None or isinstance(t, (list, tuple)) for t in taps):
            if len(taps) != n:
                raise PipelineError(
                    f"expected one --teacher-taps list per teacher ({described}; lists "
                    f"separated by ';'), or one list shared by all, got {len(taps)} lists: "
                    + "; ".join(",".join(t or []) or "(default)" for t in taps)
                )
            per_teacher = [list(t) if t else None for t in taps]
        else:
            per_teacher = [list(taps)] * n
    return [TeacherEntry(name, ck, tp) for name, ck, tp in zip(listed, cks, per_teacher)]


def load_or_train_teachers(
    data,
    names,
    checkpoints,
    train_to: Optional[str],
    epochs: int,
    seed: int = 0,
    device: str = "cpu",
    taps=None,
    log: Log = print,
    progress: bool = True,
    student_taps: Optional[Sequence[str]] = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> List[TeacherInfo]:
    """The teachers of a run (``teacher_plan(names, checkpoints, taps)``), each loaded or trained
    as ``load_or_train_teacher`` does, teacher j to ``teacher_file(train_to, j)`` with seed
    ``seed + j``. One teacher: exactly ``load_or_train_teacher``. Several: every name, tap,
    image size and checkpoint is checked before any teacher trains, so a mistake in the last
    entry does not cost the training of the first. ``student_taps``: the student's, paired
    with each teacher's taps; a teacher with another number of taps is refused first."""
    plan = teacher_plan(names, checkpoints, taps)

    def check_pairs(t_taps: List[str], who: str) -> None:
        if student_taps is not None and len(t_taps) != len(student_taps):
            raise PipelineError(
                f"{who}expected as many student taps as teacher taps, got "
                f"{list(student_taps)} and {t_taps}"
            )

    if len(plan) == 1:
        e = plan[0]
        check_pairs(resolve_taps(e.name, e.taps), "")
        return [
            load_or_train_teacher(
                data,
                e.name,
                e.checkpoint,
                train_to,
                epochs,
                seed,
                device,
                e.taps,
                log=log,
                progress=progress,
                precision=precision,
                channels_last=channels_last,
            )
        ]
    n = len(plan)
    for j, e in enumerate(plan):
        who = f"teacher {j + 1} of {n} ({e.name})"
        try:
            model = build_model(e.name, num_classes=data.num_classes, in_channels=data.channels)
            t_taps = resolve_taps(e.name, e.taps)
            for tap in t_taps:
                find_module(model, tap, who)
        except (KeyError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            where = "" if msg.startswith(who) else f"teacher {j + 1} of {n}: "
            raise PipelineError(where + msg) from None
        check_pairs(t_taps, f"{who}: ")
        check_model_fits(model, e.name, data, f"teacher {j + 1} of {n}")
        if e.checkpoint is not None and not os.path.exists(e.checkpoint):
            raise PipelineError(f"{who}: checkpoint {e.checkpoint} does not exist")
        own = teacher_file(train_to, j) if train_to else None
        if e.checkpoint is None and own and os.path.exists(own):
            # the run's own file of an earlier run with the teachers in another order
            _, meta = load_checkpoint(own)
            held = (meta or {}).get("model")
            if held is not None and held != e.name:
                raise PipelineError(
                    f"{who}: {own} holds a {held} teacher (an earlier run's teacher {j + 1}); "
                    "give the teachers in that run's order, or use another --out"
                )
        if e.checkpoint is None and not own:
            raise PipelineError(f"{who}: no teacher checkpoint given and nowhere to train one")
    return [
        load_or_train_teacher(
            data,
            e.name,
            e.checkpoint,
            teacher_file(train_to, j) if train_to else None,
            epochs,
            seed + j,
            device,
            e.taps,
            log=log,
            progress=progress,
            label=f"teacher {j + 1}/{n} {e.name}",
            precision=precision,
            channels_last=channels_last,
        )
        for j, e in enumerate(plan)
    ]


def open_store(path: str, teacher: TeacherInfo, data, verify: str = "touch"):
    """The existing feature store at ``path``, checked to hold ``teacher``'s features of
    ``data``'s training split. Another teacher or other data is a PipelineError naming both
    that says the file is left as it is; damage is the store's own StoreError (it names the
    chunk or header check and says how to rebuild). ``verify``: see FeatureStore.open."""
    try:
        return FeatureStore.open(
            path, expect_teacher_hash=teacher.hash, expect_dataset_id=data.identity, verify=verify
        )
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


def open_stores(path: str, teachers: Sequence[TeacherInfo], data, verify: str = "touch"):
    """``open_store`` for every teacher of a run, teacher j's at ``teacher_file(path, j)``: a
    FeatureStore for one teacher, an ``autokd.store.TeacherStores`` for several."""
    stores = [open_store(teacher_file(path, j), t, data, verify) for j, t in enumerate(teachers)]
    return stores[0] if len(stores) == 1 else TeacherStores(stores)


def open_or_build_stores(
    path: str,
    teachers: Sequence[TeacherInfo],
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
    """``open_or_build_store`` for every teacher of a run, teacher j's at
    ``teacher_file(path, j)``: a FeatureStore for one teacher, an ``autokd.store.TeacherStores``
    (read as one, ``batch`` giving one feature dict per teacher) for several.

    One store per teacher rather than one store of all the teachers' features, because then:
    the store format and its identity check (one teacher hash per file, refused by name when
    it differs) are those of one teacher, unchanged; a teacher's store serves every run that
    has that teacher (a one-teacher run of it, or a run that adds a teacher, which caches the
    new teacher alone instead of rebuilding everything); each is built, checked and repaired
    on its own. Reading costs one more gather per batch and teacher (memory-mapped and GIL-free
    like the first); the images are still augmented once per batch, not once per teacher."""
    stores = [
        open_or_build_store(
            teacher_file(path, j),
            t,
            data,
            augment,
            views,
            dtype,
            batch_size=batch_size,
            device=device,
            log=log,
            progress=progress,
            repair=repair,
        )
        for j, t in enumerate(teachers)
    ]
    return stores[0] if len(stores) == 1 else TeacherStores(stores)


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
    if os.path.exists(path):
        try:
            store = open_store(path, teacher, data, verify="open" if repair else "touch")
        except StoreError as e:
            if repair and getattr(e, "check", "").startswith(_STORE_DAMAGE):
                log(f"feature store: {path} is damaged ({e.check}); rebuilding it")
                return _build_store(
                    path, teacher, data, augment, views, dtype, batch_size, device, log, progress
                )
            raise
        if store.num_views != views:
            raise PipelineError(
                f"{path}: feature store has {store.num_views} views, this run asks for {views}; "
                "remove it or pass the same --views"
            )
        log(
            f"feature store: {path} ({store.num_samples} samples x {store.num_views} views"
            + (", every chunk checked)" if repair else ")")
        )
        return store
    return _build_store(
        path, teacher, data, augment, views, dtype, batch_size, device, log, progress
    )


def _build_store(path, teacher, data, augment, views, dtype, batch_size, device, log, progress):
    log(
        f"feature store: caching teacher features of {len(data.train)} samples x {views} views "
        f"to {path}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return FeatureStore.build(
        path,
        teacher.model,
        data.train,
        taps=teacher.taps,
        views=views,
        dtype=dtype,
        batch_size=batch_size,
        augment=augment,
        dataset_id=data.identity,
        progress=progress,
        device=device,
    )


def make_augment(data, seed: int):
    """The replayable augmentation of a data set: crop with the padding teacher training uses
    (``autokd.data.augment.default_padding``: 1/8 of the shorter side), flip where the data
    allow it (not for digits, whose classes are not mirror-symmetric). A streamed folder
    (autokd.data.stream) gets the random-resized crop of its image size instead."""
    if getattr(data.train, "streaming", False):
        return ReplayResizedCrop(
            seed=seed, size=data.image_size[0], flip=bool(getattr(data, "allow_flip", True))
        )
    pad = default_padding(tuple(data.image_size))
    return ReplayAugment(seed=seed, crop_padding=pad, flip=bool(getattr(data, "allow_flip", True)))
