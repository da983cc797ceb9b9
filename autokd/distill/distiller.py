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
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from autokd.nn.blocks import DistillLoss
from autokd.nn.taps import FeatureTaps
from autokd.space.spec import DistillerSpec

Tensor = torch.Tensor


@dataclass
class DistillerOutput:
    """loss_kd = loss_feature + loss_logit (weighted, scheduled); add it to the task loss."""

    loss_kd: Tensor
    loss_feature: Tensor
    loss_logit: Tensor
    student_logits: Tensor
    student_features: Dict[str, Tensor]
    teacher_features: List[Dict[str, Tensor]] = field(default_factory=list)
    teacher_logits: List[Tensor] = field(default_factory=list)
    mu: Optional[Tensor] = None


class Distiller(nn.Module):
    """Student training with a distillation design.

    Args:
        spec: a DistillerSpec, a mapping, YAML text/path or a classic distiller's name ("kd").
        student: the student; its forward returns logits [N, K].
        student_taps: module paths of the student's distilled features.
        teacher_taps: the teacher's paths paired with ``student_taps`` (default: the same
            paths); one list for every teacher or one list per teacher.
        teacher: None (offline), a module, or a list of modules (multi-teacher).
        example_input: a small batch (two samples suffice) for the dry run.
        teacher_shapes: offline: {tap: (C, H, W), "logits": (K,)}, or a list of them for
            several teachers (ignored when ``teacher`` is given).

    Feature pairs are (student tap i, teacher j tap i) for every teacher j; several pairs are
    combined by ``spec.layer_weighting`` (train-free mu_q by default).
    """

    def __init__(self, spec, student: nn.Module, student_taps: Sequence[str] = (),
                 teacher_taps: Optional[Sequence] = None,
                 teacher: Union[None, nn.Module, Sequence[nn.Module]] = None,
                 example_input: Optional[Tensor] = None,
                 teacher_shapes: Union[None, Mapping, Sequence[Mapping]] = None):
        super().__init__()
        self.spec = DistillerSpec.coerce(spec)
        self.student = student
        if isinstance(student_taps, str):
            student_taps = [student_taps]
        self.student_taps = list(student_taps)
        teachers = [] if teacher is None else ([teacher] if isinstance(teacher, nn.Module) else list(teacher))
        # teachers stay out of the module tree: not in parameters(), not switched by train()
        self.__dict__["teachers"] = teachers
        for t in teachers:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
        # with a teacher at hand its own dry run gives the shapes; teacher_shapes is then unused
        shapes_list = [] if teacher_shapes is None or teachers else (
            [teacher_shapes] if isinstance(teacher_shapes, Mapping) else list(teacher_shapes))
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
            raise ValueError(f"Distiller: expected {self.num_teachers} teacher tap lists, got {len(per_teacher)}")
        for taps in per_teacher:
            if len(taps) != len(self.student_taps):
                raise ValueError(f"Distiller: expected one teacher tap per student tap "
                                 f"({len(self.student_taps)}), got {taps!r}")
        self.teacher_taps = per_teacher
        self._student_hooks = FeatureTaps(student, self.student_taps, "Distiller: student")
        self.__dict__["_teacher_hooks"] = [FeatureTaps(t, taps, f"Distiller: teacher {j}")
                                          for j, (t, taps) in enumerate(zip(teachers, per_teacher))]

        uses_features = self.spec.feature_distance.key != "none"
        if uses_features and not self.student_taps:
            raise ValueError(f"Distiller: design {self.spec.label()} distils features; give student_taps")
        channels = []
        if uses_features:
            if example_input is None:
                raise ValueError("Distiller: example_input is needed to learn the feature shapes")
            s_shapes = self._dry_run(example_input)
            if teachers:
                t_shapes = [self._teacher_dry_run(j, example_input) for j in range(len(teachers))]
            elif shapes_list:
                t_shapes = shapes_list
            else:
                raise ValueError("Distiller: give a teacher (online) or teacher_shapes (offline)")
            for j, taps in enumerate(per_teacher):
                for s_tap, t_tap in zip(self.student_taps, taps):
                    if t_tap not in t_shapes[j]:
                        raise ValueError(f"Distiller: teacher_shapes[{j}] lacks tap {t_tap!r}; has "
                                         f"{sorted(t_shapes[j])}")
                    channels.append((int(s_shapes[s_tap][0]), int(tuple(t_shapes[j][t_tap])[0])))
        self.loss = DistillLoss(self.spec, channels if uses_features else None)

    # -- construction helpers ---------------------------------------------------------------

    def _dry_run(self, x: Tensor) -> Dict[str, tuple]:
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                self.student(x)
        finally:
            self.student.train(was_training)
        feats = self._student_hooks.take()
        return {k: tuple(v.shape[1:]) for k, v in feats.items()}

    def _teacher_dry_run(self, j: int, x: Tensor) -> Dict[str, tuple]:
        with torch.no_grad():
            logits = self.teachers[j](x)
        feats = self._teacher_hooks[j].take()
        shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
        shapes["logits"] = tuple(logits.shape[1:])
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

    def run_teachers(self, images: Tensor):
        feats, logits = [], []
        for t, hooks in zip(self.teachers, self._teacher_hooks):
            with torch.no_grad():
                logits.append(t(images))
            feats.append(hooks.take())
        return feats, logits

    def forward(self, images: Tensor, teacher_features=None, teacher_logits=None,
                labels: Optional[Tensor] = None) -> DistillerOutput:
        """``labels`` [N]: the batch's class indices, needed by designs whose logit distance
        reads the ground truth (DKD; see ``needs_labels``), ignored by the others."""
        student_logits = self.student(images)
        s_feats = self._student_hooks.take()
        if teacher_features is None and teacher_logits is None and self.teachers:
            t_feats, t_logits = self.run_teachers(images)
        else:
            t_feats = [] if teacher_features is None else (
                [teacher_features] if isinstance(teacher_features, Mapping) else list(teacher_features))
            t_logits = [] if teacher_logits is None else (
                [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits))
        fs, ft = [], []
        if self.loss.has_feature:
            if len(t_feats) != self.num_teachers:
                raise ValueError(f"Distiller: expected teacher features from {self.num_teachers} "
                                 f"teacher(s), got {len(t_feats)}")
            for j, taps in enumerate(self.teacher_taps):
                for s_tap, t_tap in zip(self.student_taps, taps):
                    if t_tap not in t_feats[j]:
                        raise ValueError(f"Distiller: teacher features lack tap {t_tap!r}; got {sorted(t_feats[j])}")
                    fs.append(s_feats[s_tap])
                    ft.append(t_feats[j][t_tap])
        if self.loss.has_logit and not t_logits:
            raise ValueError(f"Distiller: design {self.spec.label()} needs teacher logits")
        out = self.loss(fs, ft, student_logits, t_logits if self.loss.has_logit else None, labels)
        return DistillerOutput(out.loss_kd, out.loss_feature, out.loss_logit, student_logits, s_feats,
                               t_feats, t_logits, out.mu)

    def remove_hooks(self) -> None:
        self._student_hooks.remove()
        for h in self._teacher_hooks:
            h.remove()
