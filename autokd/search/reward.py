"""The proxy reward of a trial, on the held-out split carved from the training data.

    R = 1 - (L_CE(p_S, y) + L_CKA(f_S, f_T)),   L_CKA = 1 - linear CKA

over the WHOLE held-out split (never the test set). CKA compares the student's and the
teacher's tapped features, flattened per sample; with several taps the mean CKA is used. A
trial that diverged gets ``diverged_reward``: below anything a working student scores.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from autokd.train.loop import forward_all


def _cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import autokd

    fn = getattr(autokd.ops, "cka", None) or autokd.reference.cka
    return fn(x.double(), y.double(), False)


def diverged_reward(num_classes: int, worst_so_far: float = math.inf) -> float:
    """Reward recorded for a diverged trial.

    A student guessing uniformly has CE = ln K; one with twice that CE and CKA 0 scores
    1 - (2 ln K + 1). A diverged trial gets that, or the worst reward seen so far if lower, so
    it always ranks last without depending on the scale of the other rewards.
    """
    return min(1.0 - (2.0 * math.log(max(num_classes, 2)) + 1.0), worst_so_far)


@torch.no_grad()
def proxy_reward(
    student,
    images: torch.Tensor,
    labels: torch.Tensor,
    student_taps: Sequence[str],
    teacher_features: Dict[str, torch.Tensor],
    teacher_taps: Sequence[str],
    device: str = "cpu",
) -> Tuple[float, Dict[str, float]]:
    logits, feats = forward_all(student, images, student_taps, device=device)
    ce = float(F.cross_entropy(logits, labels))
    acc = float((logits.argmax(1) == labels).float().mean())
    ckas = [
        float(_cka(feats[s].flatten(1), teacher_features[t].flatten(1)))
        for s, t in zip(student_taps, teacher_taps)
    ]
    cka = sum(ckas) / len(ckas)
    reward = 1.0 - (ce + (1.0 - cka))
    return reward, {"val_ce": ce, "val_cka": cka, "val_acc": acc}
