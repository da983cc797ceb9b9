"""The proxy reward of a trial, on the held-out split carved from the training data.

    R = 1 - (L_CE(p_S, y) + L_CKA(f_S, f_T)),   L_CKA = 1 - linear CKA

over the WHOLE held-out split (never the test set). CKA compares the student's and the
teacher's tapped features, flattened per sample; with several taps the mean CKA is used, and
with several teachers the mean over every (student tap i, teacher j tap i) pair: the pairs the
Distiller distils.

Rewards are floored at ``reward_floor(K) = 1 - (2 ln K + 1)``: the score of a student with twice
the cross-entropy of uniform guessing and no feature similarity. Designs that blow the logits
up reach CE in the hundreds (measured on digits: rewards down to -330 where working designs
score -1 to 0.3); without the floor one such trial stretches the engine's min-max reward
normalisation until every working design looks alike to UCB. A trial that diverged (NaN/Inf)
gets the floor too; the raw reward is kept in the trial's metrics.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from autokd import ops
from autokd.train.loop import forward_all


def _cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ops.cka(x.double(), y.double(), False)


def reward_floor(num_classes: int) -> float:
    """The lowest reward a trial is given (see the module docstring)."""
    return 1.0 - (2.0 * math.log(max(num_classes, 2)) + 1.0)


@torch.no_grad()
def proxy_reward(
    student,
    images: torch.Tensor,
    labels: torch.Tensor,
    student_taps: Sequence[str],
    teacher_features: Union[Mapping[str, torch.Tensor], List[Mapping[str, torch.Tensor]]],
    teacher_taps: Sequence,
    device: str = "cpu",
) -> Tuple[float, Dict[str, float]]:
    """``teacher_features`` {tap: [N, ...]} and ``teacher_taps`` (paired with ``student_taps``)
    of one teacher, or a list of each, one per teacher."""
    logits, feats = forward_all(student, images, student_taps, device=device)
    ce = float(F.cross_entropy(logits, labels))
    acc = float((logits.argmax(1) == labels).float().mean())
    if isinstance(teacher_features, Mapping):
        teacher_features, teacher_taps = [teacher_features], [teacher_taps]
    ckas = [
        float(_cka(feats[s].flatten(1), tf[t].flatten(1)))
        for tf, taps in zip(teacher_features, teacher_taps)
        for s, t in zip(student_taps, taps)
    ]
    cka = sum(ckas) / len(ckas)
    raw = 1.0 - (ce + (1.0 - cka))
    reward = max(raw, reward_floor(logits.shape[1])) if math.isfinite(raw) else raw
    return reward, {"val_ce": ce, "val_cka": cka, "val_acc": acc, "raw_reward": raw}
