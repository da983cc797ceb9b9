"""autokd-cli: train-teacher, cache, search, distill, report.

User mistakes end with a one-line message (exit code 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Optional

import click

from autokd.compare import default_specs, run_compare, table_text
from autokd.data import DATASETS, load_data
from autokd.errors import PipelineError
from autokd.fsutil import check_writable_dir, os_error_message
from autokd.models import training_defaults
from autokd.pipeline import (
    default_models,
    default_proxy,
    default_training,
    load_or_train_teacher,
    load_or_train_teachers,
    make_augment,
    open_or_build_store,
    open_or_build_stores,
    resolve_taps,
    teacher_file,
    teacher_plan,
)
from autokd.search.driver import RunFolderLock, SearchConfig, run_search
from autokd.search.journal import Journal
from autokd.search.report import write_outputs
from autokd.search.reward import REWARDS
from autokd.search.selection import SelectionConfig
from autokd.space import load_space
from autokd.store import FeatureStore
from autokd.train.distributed import DistContext
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig

DEFAULT_OUT = "runs/digits"


class _Ctx:
    debug = False


# What a command reports as one line: mistakes in the inputs (PipelineError and the other
# ValueErrors, KeyError for unknown names) and the file system's refusals (OSError: missing
# files, permissions, a full disk), which name the file and say what to do.
_USER_ERRORS = (ValueError, KeyError, OSError)
# Names for the search's options.
DEFAULT_ANCHORS = ("none", "kd", "dkd", "dist", "ls_kd")
SELECT_METRICS = ("reward", "val_acc", "val_ce", "val_ce_ts")


def _fail(e: Exception):
    """A user mistake: one line (a KeyError's str() would add quotes, so use its message)."""
    if _Ctx.debug:
        raise e
    if isinstance(e, OSError) and e.errno is not None:
        msg = os_error_message(e)
    else:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    # One line, whatever the message holds (an error from a library may span several).
    raise click.ClickException(" ".join(part.strip() for part in str(msg).splitlines()))


def _schedule(data, epochs, batch_size, lr, student=None, data_fraction=None):
    """TrainConfig fields: the data set's schedule, then the student's optimizer defaults (ViTs:
    AdamW with warm-up, autokd.models.training_defaults), then what the user gave."""
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "data_fraction": data_fraction}
    sched = {k: (v if v is not None else default_training(data)[k]) for k, v in given.items()}
    model = training_defaults(student or default_models(data)[1], sched["epochs"])
    return {**sched, **model, **{k: v for k, v in given.items() if v is not None}}


def _default_help(field: str) -> str:
    """'[default: 60 on digits; 240 on cifar10, cifar100, ...]': a default of the data-set
    registry (autokd.data.DATASETS) by data set kind, as the commands apply it."""
    kinds_by_value: dict = {}
    for kind in DATASETS:
        kinds_by_value.setdefault(getattr(DATASETS.get(kind), field), []).append(kind)
    return (
        "[default: " + "; ".join(f"{v} on {', '.join(k)}" for v, k in kinds_by_value.items()) + "]"
    )


def _taps(value: Optional[str]):
    """``"a,b"``: one list (for every teacher); ``"a1,a2;b1,b2"``: one list per teacher, an
    empty one (``"a1;"``) for that teacher's default taps."""
    if not value:
        return None
    if ";" in value:
        return [
            [t.strip() for t in part.split(",") if t.strip()] or None for part in value.split(";")
        ]
    return [t.strip() for t in value.split(",") if t.strip()]


def _teachers(data, teacher, teacher_checkpoint, teacher_taps):
    """The run's teachers (autokd.pipeline.teacher_plan), checked before anything is read or
    trained: lists of different lengths end here, in one line."""
    return teacher_plan(teacher or default_models(data)[0], teacher_checkpoint, _taps(teacher_taps))


def _proxy_options(f):
    opts = [
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=None,
            help="Epochs of the full schedule; early stop trains a fraction of them "
            f"{_default_help('epochs')}.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            help=_default_help("batch_size"),
        ),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Peak learning rate (after any warm-up), cosine schedule; SGD "
            f"{_default_help('lr')}; ViT and timm students: AdamW 1e-3 with warm-up.",
        ),
        click.option(
            "--data-fraction",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="The student's share of the training split (a fixed stratified cut; the "
            f"teacher trains on all of it) {_default_help('data_fraction')}.",
        ),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _precision_options(f):
    """--precision and --channels-last (autokd/train/precision.py) of the training commands."""
    opts = [
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            help="Training precision: autocast of the forward passes "
            "to bfloat16 or float16 (with a gradient scaler); losses stay float32.",
        ),
        click.option(
            "--channels-last",
            is_flag=True,
            help="Input batches in channels-last "
            "(NHWC) memory format; faster convolutions on most hardware.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _common_options(f):
    opts = [
        click.option(
            "--data",
            default="digits",
            show_default=True,
            help="digits | cifar10:PATH | cifar100:PATH | folder:PATH | npz:FILE "
            "(local files only). "
            "folder:PATH?stream=1 streams an ImageNet-layout folder through DataLoader workers "
            "(&size=224, &classes=100 for a seeded class subset, &workers=8).",
        ),
        click.option(
            "--teacher",
            default=None,
            help="Teacher model: a zoo name, tv:NAME, timm:NAME or "
            "package.module:factory, each optionally NAME?key=value&... (constructor "
            "options); several teachers separated by commas (a,b) "
            f"{_default_help('teacher')}.",
        ),
        click.option(
            "--teacher-checkpoint",
            type=click.Path(dir_okay=False),
            default=None,
            help="Teacher weights (from train-teacher or torch.save of a state_dict); one "
            "per teacher, separated by commas, an empty entry (a.pt,) for the default. "
            "Default: <out>/teacher.pt (teacher-1.pt, ... for the next teachers), trained "
            "on the first run (teacher j with --seed + j).",
        ),
        click.option(
            "--teacher-epochs",
            type=click.IntRange(min=1),
            default=30,
            show_default=True,
            help="Epochs when the teacher has to be trained.",
        ),
        click.option(
            "--student",
            default=None,
            help="Student model, named as --teacher (e.g. vit_compact, "
            "timm:vit_tiny_patch16_224?img_size=32&patch_size=4) "
            f"{_default_help('student')}.",
        ),
        click.option(
            "--teacher-taps",
            default=None,
            help="Comma-separated module paths in the teacher, "
            "PATH:KEY for an entry of a dict/list output; several teachers: one list for "
            "all, or one per teacher separated by ';' (a1,a2;b1,b2; an empty one: that "
            "teacher's default) [default: the zoo's].",
        ),
        click.option(
            "--student-taps",
            default=None,
            help="Comma-separated module paths in the student [default: the zoo's].",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seeds the split, the augmentation, the search and the initialisations.",
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=DEFAULT_OUT,
            show_default=True,
            help="Output folder (journal, spec, report, teacher, store).",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


class _Commands(click.Group):
    """The CLI's one error boundary: a user mistake anywhere in a command (the exceptions of
    _USER_ERRORS, autokd.errors.PipelineError among them) ends in one line, exit code 1;
    ``--debug`` shows its traceback instead. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as e:
            _fail(e)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="autokd")
def main(debug):
    """autokd: search for the best knowledge-distillation design for a teacher/student pair
    (Auto-KD), then train the student with it.

    \b
    Typical use:
      autokd-cli search                      # everything on the embedded digits data
      autokd-cli distill --spec runs/digits/best.yaml
    """
    _Ctx.debug = debug


def _writable(folder: str, option: str) -> None:
    """Refuse an unwritable output folder now, before data are read or anything trains."""
    check_writable_dir(folder or ".", option)


def _teacher_to_train(out: str, teacher_checkpoint: str | None, plan=None) -> bool:
    """Whether a teacher will be trained into ``out`` (``plan``: the run's teachers)."""
    if plan is None or len(plan) == 1:
        return not teacher_checkpoint and not os.path.exists(os.path.join(out, "teacher.pt"))
    own = os.path.join(out, "teacher.pt")
    return any(
        e.checkpoint is None and not os.path.exists(teacher_file(own, j))
        for j, e in enumerate(plan)
    )


def _load(data, seed, val_fraction=0.1):
    return load_data(data, val_fraction=val_fraction, seed=seed)


@main.command("train-teacher")
@_common_options
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint path [default: <out>/teacher.pt].",
)
@click.option("--device", default="cpu", show_default=True)
@_precision_options
def train_teacher_cmd(
    data,
    teacher,
    teacher_checkpoint,
    teacher_epochs,
    student,
    teacher_taps,
    student_taps,
    seed,
    out,
    output,
    device,
    precision,
    channels_last,
):
    """Train a teacher on the training split and save its checkpoint.

    Several teachers (--teacher a,b): each is trained, teacher j with --seed + j, to --output
    (default <out>/teacher.pt) and, for j >= 1, teacher-<j>.pt beside it: the files a search or
    distill with the same --teacher list and --out finds.
    """
    plan = _teachers(data, teacher, None, teacher_taps)
    path = output or os.path.join(out, "teacher.pt")
    for p in (teacher_file(path, j) for j in range(len(plan))):
        if os.path.exists(p):
            raise PipelineError(f"{p} exists; remove it or pass another --output")
    _writable(os.path.dirname(path), "--output" if output else "--out")
    bundle = _load(data, seed)
    infos = load_or_train_teachers(
        bundle,
        [e.name for e in plan],
        None,
        path,
        teacher_epochs,
        seed,
        device,
        _taps(teacher_taps),
        log=click.echo,
        precision=precision,
        channels_last=channels_last,
    )
    for info in infos:
        click.echo(f"teacher saved to {info.checkpoint} (test accuracy {info.test_accuracy:.4f})")


@main.command("cache")
@_common_options
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Augmented views per sample.",
)
@click.option(
    "--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True
)
@click.option(
    "--store",
    type=click.Path(dir_okay=False),
    default=None,
    help="Store path [default: <out>/teacher_features.akds].",
)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--verify",
    "verify_only",
    is_flag=True,
    help="Only check the existing store (header and every data chunk) and report OK or the "
    "damage (exit code 1); builds nothing.",
)
def cache_cmd(
    data,
    teacher,
    teacher_checkpoint,
    teacher_epochs,
    student,
    teacher_taps,
    student_taps,
    seed,
    out,
    views,
    dtype,
    store,
    device,
    verify_only,
):
    """Run the teacher once over the augmented training split and store its features.

    An existing store of the same teacher and data is checked chunk by chunk and kept; a damaged
    one is rebuilt; one of another teacher or other data is refused and left as it is.

    Several teachers (--teacher a,b): one store each, teacher j's at <store> for the first and
    <store stem>-<j>.akds for the next (teacher_features-1.akds, ...).
    """
    path = store or os.path.join(out, "teacher_features.akds")
    # only a named list of teachers says how many stores to check: --verify reads no model
    plan = (
        _teachers(data, teacher, teacher_checkpoint, teacher_taps)
        if (teacher or not verify_only)
        else None
    )
    paths = [teacher_file(path, j) for j in range(len(plan) if plan else 1)]
    if verify_only:
        for p in paths:
            s = FeatureStore.open(p, verify="open")
            click.echo(
                f"store {p}: OK ({s.num_samples} samples x {s.num_views} views, "
                f"{s.num_chunks} data chunks and the header match their checksums)"
            )
        return
    _writable(os.path.dirname(path), "--store" if store else "--out")
    if _teacher_to_train(out, teacher_checkpoint, plan):
        _writable(out, "--out")
    bundle = _load(data, seed)
    infos = load_or_train_teachers(
        bundle,
        [e.name for e in plan],
        teacher_checkpoint,
        os.path.join(out, "teacher.pt"),
        teacher_epochs,
        seed,
        device,
        _taps(teacher_taps),
        log=click.echo,
    )
    opened = open_or_build_stores(
        path,
        infos,
        bundle,
        make_augment(bundle, seed),
        views,
        dtype,
        device=device,
        log=click.echo,
        repair=True,
    )
    for p, s in zip(paths, getattr(opened, "stores", [opened])):
        click.echo(f"store {p}: {s.num_samples} samples x {s.num_views} views")


@main.command("search")
@_common_options
@_proxy_options
@click.option(
    "--space", default="autokd", show_default=True, help="autokd | extended | path to a space YAML."
)
@click.option(
    "--strategy",
    type=click.Choice(["mcts", "random", "tpe"]),
    default="mcts",
    show_default=True,
    help="MCTS; or, for comparisons at the same budget, uniform random search or Optuna's TPE "
    "(pip install 'autokd[tpe]').",
)
@click.option(
    "--budget",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Total trials (a resumed search counts its finished trials).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop starting trials after this many seconds.",
)
@click.option(
    "--subset",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help=f"Fraction of the student's training data per trial {_default_help('proxy_subset')}.",
)
@click.option(
    "--stop-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Early stop: fraction of --epochs trained per trial "
    f"{_default_help('proxy_stop_fraction')}; ViT and timm students: "
    + "; ".join(
        f"{DATASETS.get(k).transformer_proxy_stop_fraction} on {k}"
        for k in DATASETS
        if DATASETS.get(k).transformer_proxy_stop_fraction is not None
    )
    + ".",
)
@click.option(
    "--sparsity",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Fraction of student weights pruned during trials (0: dense) "
    f"{_default_help('proxy_sparsity')}.",
)
@click.option(
    "--online",
    is_flag=True,
    help="Run the teacher in every trial instead of reading the feature store.",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Augmented views cached per training sample; epoch e reads view e mod K.",
)
@click.option("--exploration", type=float, default=None, help="UCB exploration constant C.")
@click.option(
    "--reward",
    type=click.Choice(list(REWARDS)),
    default="paper",
    show_default=True,
    help="Each trial's score on the held-out split: paper, 1 - (CE + 1 - CKA); calibrated, "
    "the same with the CE after temperature scaling (blind to the logits' scale, as the "
    "selection stage's val_ce_ts is).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where trials run: local processes, or Ray tasks (pip install 'autokd[ray]').",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Trials at once. local: 1 runs in this process (serial); N starts N worker processes, "
    "with --device cuda pinned round-robin to the visible GPUs. ray: tasks in flight, 1 GPU "
    "(--device cuda) or 1 CPU each. [default: 1; with --workers-per-gpu K, K per GPU]",
)
@click.option(
    "--workers-per-gpu",
    type=click.IntRange(min=1),
    default=None,
    help="With --device cuda: K trials share each GPU (small students leave one GPU mostly "
    "idle); --workers defaults to K x visible GPUs (Ray: K x the cluster's GPUs, 1/K GPU "
    "per task).",
)
@click.option(
    "--ray-address",
    default=None,
    help="Address of a running Ray cluster (e.g. ray://head:10001 or auto) [default: "
    "RAY_ADDRESS, else a local cluster for this search]. On a cluster, --out must be on a "
    "shared file system.",
)
@click.option(
    "--finalists",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Selection stage: the search's best designs (by estimated reward) that meet the classics.",
)
@click.option(
    "--anchors",
    default=",".join(DEFAULT_ANCHORS),
    show_default=True,
    help="Selection stage: classic distillers (configs/distillers, or none) measured against "
    "the search's best; best.yaml is a classic when the search did not beat it.",
)
@click.option(
    "--select-fidelity",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Selection stage: the last round's fraction of the full schedule (1: full trainings), "
    "where the search's best meets every classic; earlier rounds halve the finalists at half "
    "the next one's fidelity. The stage costs 13.5x this in full trainings (3 finalists, 5 "
    "anchors, 2 seeds), and up to 6x more when a close call is raced (--select-max-seeds). "
    "0: no stage; best.yaml is then the search's design of best estimate.",
)
@click.option(
    "--select-seeds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Selection stage: seeds per candidate after the first round.",
)
@click.option(
    "--select-max-seeds",
    type=click.IntRange(min=1),
    default=None,
    help="Selection stage: when the search's best and the best classic are apart by less than "
    "the seed noise in the last round, both get one more seed at a time up to this many (at "
    "most 2 x (this - --select-seeds) x --select-fidelity more full trainings); equal to "
    "--select-seeds: off. [default: 5, or --select-seeds when larger]",
)
@click.option(
    "--select-metric",
    type=click.Choice(list(SELECT_METRICS)),
    default="val_ce_ts",
    show_default=True,
    help="Selection stage: held-out score to rank by: val_ce_ts, the cross-entropy after "
    "temperature scaling (blind to the logits' scale, which DIST-like losses leave "
    "under-confident); reward, the proxy's 1 - (CE + 1 - CKA); val_acc; val_ce.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_precision_options
def search_cmd(
    data,
    teacher,
    teacher_checkpoint,
    teacher_epochs,
    student,
    teacher_taps,
    student_taps,
    seed,
    out,
    epochs,
    batch_size,
    lr,
    data_fraction,
    device,
    space,
    strategy,
    budget,
    time_limit,
    subset,
    stop_fraction,
    sparsity,
    online,
    views,
    exploration,
    reward,
    executor,
    workers,
    workers_per_gpu,
    ray_address,
    finalists,
    anchors,
    select_fidelity,
    select_seeds,
    select_max_seeds,
    select_metric,
    quiet,
    precision,
    channels_last,
):
    """Search the best distiller design (MCTS over the space, proxy trial per design).

    With no options: the whole pipeline on the embedded digits data (teacher trained and cached
    on the first run). Running the same command again resumes the search from its journal.

    \b
    Several trials at once:
      autokd-cli search --device cuda --workers 4            # 4 local GPUs, one worker each
      autokd-cli search --device cuda --workers-per-gpu 4    # 4 trials on every local GPU
      autokd-cli search --executor ray --device cuda --workers 16 --ray-address auto
    On a Ray cluster --out (teacher, feature store) and file-based --data must be on a file
    system every node can read.
    """
    if ray_address is not None and executor != "ray":
        raise click.UsageError("--ray-address needs --executor ray")
    if workers_per_gpu is not None and not device.startswith("cuda"):
        raise click.UsageError(f"--workers-per-gpu needs --device cuda (got --device {device})")
    if workers is None and workers_per_gpu is None:
        workers = 1
    _teachers(data, teacher, teacher_checkpoint, teacher_taps)
    _writable(out, "--out")
    sched = _schedule(data, epochs, batch_size, lr, student, data_fraction)
    given = {"subset": subset, "stop_fraction": stop_fraction, "sparsity": sparsity}
    defaults = default_proxy(data, student)
    accel = {k: (v if v is not None else defaults[k]) for k, v in given.items()}
    proxy = TrainConfig(
        **sched,
        **accel,
        offline=not online,
        seed=seed,
        device=device,
        precision=precision,
        channels_last=channels_last,
    )
    selection = SelectionConfig(
        finalists=finalists,
        anchors=_taps(anchors) or (),
        fidelity=select_fidelity,
        seeds=select_seeds,
        max_seeds=(
            select_max_seeds
            if select_max_seeds is not None
            else max(SelectionConfig.max_seeds, select_seeds)
        ),
        metric=select_metric,
    )
    cfg = SearchConfig(
        data=data,
        teacher=teacher,
        teacher_checkpoint=teacher_checkpoint,
        teacher_epochs=teacher_epochs,
        student=student,
        teacher_taps=_taps(teacher_taps),
        student_taps=_taps(student_taps),
        space=space,
        strategy=strategy,
        budget=budget,
        time_limit=time_limit,
        seed=seed,
        out=out,
        views=views,
        exploration=exploration,
        reward=reward,
        proxy=proxy,
        executor=executor,
        workers=workers,
        ray_address=ray_address,
        selection=selection,
        workers_per_gpu=workers_per_gpu,
    )
    res = run_search(cfg, log=click.echo, progress=not quiet)
    click.echo(f"{len(res.trials)} trials ({res.new_trials} new) in {res.seconds:.0f} s")
    if res.best_spec_path:
        if res.selection is not None:
            w = res.selection.winner
            what = "a classic: the search's best did not beat it" if w.is_anchor else "searched"
            click.echo(f"best spec:  {res.best_spec_path}  ({w.label}, {what})")
        else:
            click.echo(
                f"best spec:  {res.best_spec_path}  (estimated reward {res.best.reward:.4f})"
            )
    click.echo(f"report:     {res.report_path}")
    # the models the search had, so that compare and distill train the student it searched for
    models = "".join(
        f" {opt} {shlex.quote(v)}"
        for opt, v in (
            ("--teacher", teacher),
            ("--teacher-checkpoint", teacher_checkpoint),
            ("--teacher-taps", teacher_taps),
            ("--student", student),
            ("--student-taps", student_taps),
        )
        if v
    )
    click.echo(
        f"next:       autokd-cli compare --data {data} --out {out}{models}   "
        "# full training: best.yaml vs classics vs the student alone, 3 seeds"
    )
    click.echo(
        f"            autokd-cli distill --data {data} --out {out}{models} "
        f"--spec {res.best_spec_path or 'kd'}"
    )


@main.command("distill")
@_common_options
@_proxy_options
@click.option(
    "--spec",
    required=True,
    help="A spec YAML (e.g. best.yaml of a search), a classic distiller "
    "(kd, at, sp, cwd, dist, ickd, mgd, fitnet, ...) or none.",
)
@click.option(
    "--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True
)
@click.option(
    "--offline",
    is_flag=True,
    help="Read teacher features from the feature store instead of running the teacher.",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Augmented views in the feature store (with --offline).",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Checkpoints and results [default: <out>/distill-<spec>-<seed>].",
)
@click.option(
    "--sync-bn/--no-sync-bn",
    default=True,
    show_default=True,
    help="Under torchrun: BatchNorm statistics over the global batch (as one process), or "
    "per process.",
)
@click.option("--quiet", is_flag=True)
@_precision_options
def distill_cmd(
    data,
    teacher,
    teacher_checkpoint,
    teacher_epochs,
    student,
    teacher_taps,
    student_taps,
    seed,
    out,
    epochs,
    batch_size,
    lr,
    data_fraction,
    device,
    spec,
    sparsity,
    offline,
    views,
    run_dir,
    sync_bn,
    quiet,
    precision,
    channels_last,
):
    """Train the student for real with a spec; resumes from its checkpoint; ends with test accuracy.

    \b
    Data parallel: torchrun --nproc_per_node=N -m autokd.cli distill ...
    --batch-size is then the global batch (each process takes batch/N; it must divide), rank 0
    alone writes logs, checkpoints and results; the teacher (and, with --offline, the feature
    store) must exist first: run train-teacher (and cache) in one process.
    """
    ctx = None
    try:
        ctx = DistContext.from_env(device, sync_bn=sync_bn)
        device = ctx.device
        plan = _teachers(data, teacher, teacher_checkpoint, teacher_taps)
        log = click.echo if ctx.is_main else (lambda _m: None)
        quiet = quiet or not ctx.is_main
        the_spec = resolve_spec(spec)
        sched = _schedule(data, epochs, batch_size, lr, student, data_fraction)
        ctx.check_batch(sched["batch_size"])
        name = os.path.splitext(os.path.basename(spec))[0]
        run_dir_option = "--run-dir" if run_dir else "--out"
        run_dir = run_dir or os.path.join(out, f"distill-{name}-{seed}")
        store_path = os.path.join(out, "teacher_features.akds")
        store_paths = [teacher_file(store_path, j) for j in range(len(plan))]
        if ctx.is_main:  # rank 0 alone writes
            _writable(run_dir, run_dir_option)
            if _teacher_to_train(out, teacher_checkpoint, plan) or (
                offline and not all(os.path.exists(p) for p in store_paths)
            ):
                _writable(out, "--out")
        bundle = _load(data, seed)
        t_name, s_name = default_models(data)
        s_name = student or s_name
        if ctx.distributed:
            # one process prepares these, before the data-parallel run: a rank training a
            # teacher for hours would leave the others waiting past any collective's timeout
            also = f" --teacher {teacher}" if len(plan) > 1 else ""
            for j, e in enumerate(plan):
                t_path = teacher_file(os.path.join(out, "teacher.pt"), j)
                if not e.checkpoint and not os.path.exists(t_path):
                    raise PipelineError(
                        f"{t_path} does not exist: under torchrun the teacher must exist; run "
                        f"`autokd-cli train-teacher --data {data} --out {out}{also}` first"
                    )
            for p in store_paths:
                if offline and not os.path.exists(p):
                    raise PipelineError(
                        f"{p} does not exist: under torchrun with --offline the feature store must "
                        f"exist; run `autokd-cli cache --data {data} --out {out}{also}` first"
                    )
        s_taps = resolve_taps(s_name, _taps(student_taps))
        infos = load_or_train_teachers(
            bundle,
            teacher or t_name,
            teacher_checkpoint,
            os.path.join(out, "teacher.pt"),
            teacher_epochs,
            seed,
            device,
            _taps(teacher_taps),
            log=log,
            progress=not quiet,
            student_taps=s_taps,
            precision=precision,
            channels_last=channels_last,
        )
        augment = make_augment(bundle, seed)
        store = None
        if offline:
            store = open_or_build_stores(
                store_path,
                infos,
                bundle,
                augment,
                views,
                "fp16",
                device=device,
                log=log,
                progress=not quiet,
            )
        cfg = TrainConfig(
            **sched,
            sparsity=sparsity,
            offline=offline,
            seed=seed,
            device=device,
            precision=precision,
            channels_last=channels_last,
        )
        ctx.init()
        if ctx.distributed:
            log(
                f"data parallel: {ctx.world_size} processes ({ctx.backend}), global batch "
                f"{cfg.batch_size} "
                f"= {ctx.world_size} x {cfg.batch_size // ctx.world_size}, "
                f"{'synchronised' if sync_bn else 'per-process'} BatchNorm"
            )
        teachers = infos[0] if len(infos) == 1 else infos
        res = run_distill(
            the_spec,
            bundle,
            teachers,
            s_name,
            s_taps,
            cfg,
            run_dir,
            store=store,
            augment=augment,
            log=log,
            progress=not quiet,
            dist=ctx,
        )
    except _USER_ERRORS as e:
        if ctx is not None and not ctx.is_main:
            # every rank meets the same mistake; one message is enough
            raise click.exceptions.Exit(1)
        _fail(e)
    finally:
        if ctx is not None:
            ctx.close()
    log(
        f"test accuracy {res.test_accuracy:.4f} (CE {res.test_ce:.4f}) after {res.epochs} epochs; "
        f"checkpoint {res.checkpoint}"
    )


@main.command("compare")
@_common_options
@_proxy_options
@click.option(
    "--specs",
    default=None,
    help="Comma-separated specs: YAML files or classic distillers (kd, dkd, dist, none, ...) "
    "[default: <out>/best.yaml if a search wrote one, then kd, dkd, dist, none].",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Seeds per spec: --seed, --seed + 1, ...",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Read teacher features from the feature store instead of running the teacher.",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Augmented views in the feature store (with --offline).",
)
@click.option("--quiet", is_flag=True)
def compare_cmd(
    data,
    teacher,
    teacher_checkpoint,
    teacher_epochs,
    student,
    teacher_taps,
    student_taps,
    seed,
    out,
    epochs,
    batch_size,
    lr,
    data_fraction,
    device,
    specs,
    seeds,
    offline,
    views,
    quiet,
):
    """Full training of several specs with several seeds: what the search was worth.

    Each (spec, seed) is a distill run in <out>/compare/<spec>-<hash>-<seed> (resumable;
    finished runs are never rerun; a changed best.yaml gets new runs). The table (mean +- std
    and per seed) goes to <out>/compare.md and compare.json, and into report.html when <out>
    holds a search.
    """
    _writable(out, "--out")
    names = _taps(specs) or default_specs(out)
    sched = _schedule(data, epochs, batch_size, lr, student, data_fraction)
    with RunFolderLock(out, "compare"):
        bundle = _load(data, seed)
        t_name, s_name = default_models(data)
        s_name = student or s_name
        info = load_or_train_teacher(
            bundle,
            teacher or t_name,
            teacher_checkpoint,
            os.path.join(out, "teacher.pt"),
            teacher_epochs,
            seed,
            device,
            _taps(teacher_taps),
            log=click.echo,
            progress=not quiet,
        )
        augment = make_augment(bundle, seed)
        store = None
        if offline:
            store = open_or_build_store(
                os.path.join(out, "teacher_features.akds"),
                info,
                bundle,
                augment,
                views,
                "fp16",
                device=device,
                log=click.echo,
                progress=not quiet,
            )
        rows = run_compare(
            names,
            [seed + i for i in range(seeds)],
            bundle,
            info,
            s_name,
            resolve_taps(s_name, _taps(student_taps)),
            lambda s: TrainConfig(**sched, offline=offline, seed=s, device=device),
            out,
            store=store,
            augment=augment,
            log=click.echo,
        )
        if os.path.exists(os.path.join(out, "journal.sqlite")):
            _rebuild_report(out)
    click.echo(table_text(rows))
    click.echo(f"table: {os.path.join(out, 'compare.md')}")


def _rebuild_report(out: str) -> None:
    with Journal(os.path.join(out, "journal.sqlite")) as j:
        trials, config, evaluations = j.trials(), j.stored_config, j.evaluations()
        record = j.selection()
    write_outputs(
        out,
        trials,
        load_space(config.get("space", "autokd")),
        log=lambda _m: None,
        config=config,
        evaluations=evaluations,
        selection_record=record,
    )


@main.command("report")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=DEFAULT_OUT,
    show_default=True,
    help="A search's output folder.",
)
@click.option(
    "--space", default=None, help="Space of the search [default: the one in the journal]."
)
def report_cmd(out, space):
    """Rebuild best.yaml, top.yaml and report.html from a search's journal."""
    path = os.path.join(out, "journal.sqlite")
    if not os.path.exists(path):
        raise PipelineError(f"{path} does not exist: is {out} the --out folder of a search?")
    with Journal(path) as j:
        trials, config, evaluations = j.trials(), j.stored_config, j.evaluations()
        record = j.selection()
    sp = load_space(space or config.get("space", "autokd"))
    res = write_outputs(
        out,
        trials,
        sp,
        log=click.echo,
        config=config,
        evaluations=evaluations,
        selection_record=record,
    )
    click.echo(f"report: {res['report']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
