"""``Distiller``: a ``DistillerSpec`` applied to a real student (and teacher).

Features are taken by module path with forward hooks (no model rewrite). The student runs
inside; the teacher either runs inside too (online: ``teacher=`` one module or a list) or its
features and logits come from outside (offline: from the feature store, shapes announced by
``teacher_shapes``). One dry run on ``example_input`` at construction learns the channel
counts, so every adapter exists before the optimizer is built.

``d.parameters()`` holds the student's and the adapters' parameters (and any trainable part of
a design, such as MGD's generator), never a teacher's: teachers are kept outside the module
tree, in eval mode, run under no_grad; move them to the device yourself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from autokd.nn.blocks import DistillLoss
from autokd.nn.taps import FeatureTaps
from autokd.space.spec import DistillerSpec

Tensor = torch.Tensor


@dataclass
class DistillerOutput:
    """loss_kd = loss_feature + loss_logit (weighted, scheduled); add it to the task loss.

    ``student_output`` is whatever the student returned (a detector's dict of losses in train
    mode, a segmenter's dict of maps); ``student_logits`` is that output when it is a tensor
    (a classifier's logits), else None. ``teacher_logits`` likewise holds the teachers' outputs.
    """

    loss_kd: Tensor
    loss_feature: Tensor
    loss_logit: Tensor
    student_logits: Optional[Tensor]
    student_features: Dict[str, Tensor]
    teacher_features: List[Dict[str, Tensor]] = field(default_factory=list)
    teacher_logits: List[Tensor] = field(default_factory=list)
    mu: Optional[Tensor] = None
    student_output: Any = None


def _describe_output(output) -> str:
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (list, tuple)):
        return f"{type(output).__name__} of {len(output)}"
    return type(output).__name__


class Distiller(nn.Module):
    """Student training with a distillation design.

    Args:
        spec: a DistillerSpec, a mapping, YAML text/path or a classic distiller's name ("kd").
        student: the student; its forward returns logits [N, K], or anything else (a
            torchvision detector's dict of losses, a segmenter's dict of maps) with a design
            that has no logit term.
        student_taps: module paths of the student's distilled features; ``path:KEY`` picks one
            entry of a dict, list or tuple output (``"backbone:0"``: the finest level of a
            torchvision FPN), see ``autokd.nn.taps``.
        teacher_taps: the teacher's paths paired with ``student_taps`` (default: the same
            paths); one list for every teacher or one list per teacher.
        teacher: None (offline), a module, or a list of modules (multi-teacher).
        example_input: a small batch (two samples suffice) for the dry run: whatever the
            student's forward takes first (a list of images for a torchvision detector).
        teacher_shapes: offline: {tap: (C, H, W), "logits": (K,)}, or a list of them for
            several teachers (ignored when ``teacher`` is given).

    Feature pairs are (student tap i, teacher j tap i) for every teacher j; several pairs are
    combined by ``spec.layer_weighting`` (train-free mu_q by default). The logit term of several
    teachers is the mean of the per-teacher logit distances (``DistillLoss`` says why).
    """

    def __init__(
        self,
        spec,
        student: nn.Module,
        student_taps: Sequence[str] = (),
        teacher_taps: Optional[Sequence] = None,
        teacher: Union[None, nn.Module, Sequence[nn.Module]] = None,
        example_input: Optional[Tensor] = None,
        teacher_shapes: Union[None, Mapping, Sequence[Mapping]] = None,
    ):
        super().__init__()
        self.spec = DistillerSpec.coerce(spec)
        self.student = student
        if isinstance(student_taps, str):
            student_taps = [student_taps]
        self.student_taps = list(student_taps)
        teachers = (
            []
            if teacher is None
            else ([teacher] if isinstance(teacher, nn.Module) else list(teacher))
        )
        # teachers stay out of the module tree: not in parameters(), not switched by train()
        self.__dict__["teachers"] = teachers
        for t in teachers:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
        # with a teacher at hand its own dry run gives the shapes; teacher_shapes is then unused
        shapes_list = (
            []
            if teacher_shapes is None or teachers
            else ([teacher_shapes] if isinstance(teacher_shapes, Mapping) else list(teacher_shapes))
        )
        self.num_teachers = len(teachers) or len(shapes_list) or 1
        if teacher_taps is None:
            teacher_taps = self.student_taps
        if isinstance(teacher_taps, str):
            teacher_taps = [teacher_taps]
        teacher_taps = list(teacher_taps)
        if teacher_taps and all(isinstance(x, (list, tuple)) for x in teacher_taps):
            per_teacher = [list(x) for x in teacher_taps]
        else:
            per_teacher = [list(teacher_taps)] * self.num_teachers
        if len(per_teacher) != self.num_teachers:
            raise ValueError(
                f"Distiller: expected {self.num_teachers} teacher tap lists, got {len(per_teacher)}"
            )
        for taps in per_teacher:
            if len(taps) != len(self.student_taps):
                raise ValueError(
                    f"Distiller: expected one teacher tap per student tap "
                    f"({len(self.student_taps)}), got {taps!r}"
                )
        self.teacher_taps = per_teacher
        self._student_hooks = FeatureTaps(student, self.student_taps, "Distiller: student")
        self.__dict__["_teacher_hooks"] = [
            FeatureTaps(t, taps, f"Distiller: teacher {j}")
            for j, (t, taps) in enumerate(zip(teachers, per_teacher))
        ]

        uses_features = self.spec.feature_distance.key != "none"
        if uses_features and not self.student_taps:
            raise ValueError(
                f"Distiller: design {self.spec.label()} distils features; give student_taps"
            )
        channels = []
        s_shapes = None
        if example_input is not None and (uses_features or self.spec.logit_distance.key != "none"):
            # the dry run also catches a logit term on a student without class logits, now
            # rather than at the first training step
            s_shapes = self._dry_run(example_input)
        if uses_features:
            if example_input is None:
                raise ValueError("Distiller: example_input is needed to learn the feature shapes")
            if teachers:
                t_shapes = [self._teacher_dry_run(j, example_input) for j in range(len(teachers))]
            elif shapes_list:
                t_shapes = shapes_list
            else:
                raise ValueError("Distiller: give a teacher (online) or teacher_shapes (offline)")
            for j, taps in enumerate(per_teacher):
                for s_tap, t_tap in zip(self.student_taps, taps):
                    if t_tap not in t_shapes[j]:
                        raise ValueError(
                            f"Distiller: teacher_shapes[{j}] lacks tap {t_tap!r}; has "
                            f"{sorted(t_shapes[j])}"
                        )
                    channels.append((int(s_shapes[s_tap][0]), int(tuple(t_shapes[j][t_tap])[0])))
        self.loss = DistillLoss(self.spec, channels if uses_features else None)

    # -- construction helpers ---------------------------------------------------------------

    def _dry_run(self, x) -> Dict[str, tuple]:
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                output = self.student(x)
        finally:
            self.student.train(was_training)
        feats = self._student_hooks.take()
        self._check_logits(output)
        return {k: tuple(v.shape[1:]) for k, v in feats.items()}

    def _check_logits(self, output) -> None:
        if self.spec.logit_distance.key != "none" and not isinstance(output, Tensor):
            raise ValueError(
                f"Distiller: design {self.spec.label()} has a logit term "
                f"({self.spec.logit_distance.key!r}), but the student returns "
                f"{_describe_output(output)}, not class logits [N, K]; a detector or segmenter "
                "distils through its feature taps: use a design with logit_distance none "
                "(feature terms only, e.g. 'cwd' or 'fitnet')"
            )

    def _teacher_dry_run(self, j: int, x) -> Dict[str, tuple]:
        with torch.no_grad():
            output = self.teachers[j](x)
        feats = self._teacher_hooks[j].take()
        shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
        if isinstance(output, Tensor):
            shapes["logits"] = tuple(output.shape[1:])
        return shapes

    # -- training ---------------------------------------------------------------------------

    @property
    def needs_labels(self) -> bool:
        """Whether ``forward`` needs ``labels=`` (DKD-style designs read the ground truth)."""
        return self.loss.needs_labels

    def set_progress(self, fraction: float) -> None:
        """Fraction of training done (0..1), for the warm-up / early-stop weight schedules."""
        self.loss.set_progress(fraction)

    def adapter_parameters(self):
        """The parameters the design adds (adapters, generators), without the student's."""
        return self.loss.parameters()

    def run_teachers(self, images):
        """Each teacher on ``images`` (eval mode, no_grad): (features by tap, outputs)."""
        feats, logits = [], []
        for t, hooks in zip(self.teachers, self._teacher_hooks):
            with torch.no_grad():
                logits.append(t(images))
            feats.append(hooks.take())
        return feats, logits

    def forward(
        self,
        images,
        *student_args,
        teacher_features=None,
        teacher_logits=None,
        labels: Optional[Tensor] = None,
        **student_kwargs,
    ) -> DistillerOutput:
        """The student on ``student(images, *student_args, **student_kwargs)`` (e.g. a
        detector's ``targets`` in train mode), the teachers on ``images`` alone; the KD loss of
        the design on their taps (and logits).

        ``labels`` [N]: the batch's class indices, needed by designs whose logit distance reads
        the ground truth (DKD; see ``needs_labels``), ignored by the others. A student whose
        output is not a tensor (a dict of losses or maps) works with feature-only designs; its
        output is ``student_output``.
        """
        output = self.student(images, *student_args, **student_kwargs)
        s_feats = self._student_hooks.take()
        self._check_logits(output)
        student_logits = output if isinstance(output, Tensor) else None
        if (
            teacher_features is None
            and teacher_logits is None
            and self.teachers
            and self.spec.uses_teacher()
        ):
            # a design without a teacher term (the student alone) never runs the teachers
            t_feats, t_logits = self.run_teachers(images)
        else:
            t_feats = (
                []
                if teacher_features is None
                else (
                    [teacher_features]
                    if isinstance(teacher_features, Mapping)
                    else list(teacher_features)
                )
            )
            t_logits = (
                []
                if teacher_logits is None
                else (
                    [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)
                )
            )
        fs, ft = [], []
        if self.loss.has_feature:
            if len(t_feats) != self.num_teachers:
                raise ValueError(
                    f"Distiller: expected teacher features from {self.num_teachers} "
                    f"teacher(s), got {len(t_feats)}"
                )
            for j, taps in enumerate(self.teacher_taps):
                for s_tap, t_tap in zip(self.student_taps, taps):
                    if t_tap not in t_feats[j]:
                        raise ValueError(
                            f"Distiller: teacher features lack tap {t_tap!r}; "
                            f"got {sorted(t_feats[j])}"
                        )
                    fs.append(s_feats[s_tap])
                    ft.append(t_feats[j][t_tap])
        if self.loss.has_logit and not t_logits:
            raise ValueError(f"Distiller: design {self.spec.label()} needs teacher logits")
        if self.loss.has_logit:
            bad = next((t for t in t_logits if not isinstance(t, Tensor)), None)
            if bad is not None:
                raise ValueError(
                    f"Distiller: design {self.spec.label()} has a logit term, but a "
                    f"teacher returns {_describe_output(bad)}, not class logits "
                    "[N, K]; use a design with logit_distance none"
                )
        out = self.loss(fs, ft, student_logits, t_logits if self.loss.has_logit else None, labels)
        return DistillerOutput(
            out.loss_kd,
            out.loss_feature,
            out.loss_logit,
            student_logits,
            s_feats,
            t_feats,
            t_logits,
            out.mu,
            output,
        )

    def remove_hooks(self) -> None:
        self._student_hooks.remove()
        for h in self._teacher_hooks:
            h.remove()
