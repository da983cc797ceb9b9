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


#: The trial rewards ``proxy_reward`` computes (``SearchConfig.reward``, ``--reward``).
REWARDS = ("paper", "calibrated")


def reward_floor(num_classes: int) -> float:
    """The lowest reward a trial is given (see the module docstring)."""
    return 1.0 - (2.0 * math.log(max(num_classes, 2)) + 1.0)


def calibrated_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy after temperature scaling: min over s >= 0 of CE(s * logits, labels), the
    held-out NLL with the one scale that suits it best (Guo et al., 2017, fit on the same
    split). It ranks students by how well their logits order the classes, not by their scale:
    losses that are invariant to the logits' scale (DIST's and Pearson's correlations) leave
    under-confident students whose plain CE is high at a good accuracy (measured on the digits
    ViT task: DIST 0.76 held-out accuracy at CE 1.43, a searched design 0.73 at 1.03).

    CE(s * z) is convex in s (a log-sum-exp of lines minus a line), so a golden-section search
    on a bracket found by doubling finds the minimum; s = 0 is uniform guessing (ln K)."""
    z = logits.detach().double()
    y = labels.detach()

    def f(scale: float) -> float:
        return float(F.cross_entropy(z * scale, y))

    lo, hi = 0.0, 1.0
    while f(2 * hi) < f(hi) and hi < 1e6:  # the minimum lies below 2 * hi
        lo, hi = hi, 2 * hi
    hi = 2 * hi
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return min(fc, fd, f(0.0))


@torch.no_grad()
def proxy_reward(
    student,
    images: torch.Tensor,
    labels: torch.Tensor,
    student_taps: Sequence[str],
    teacher_features: Union[Mapping[str, torch.Tensor], List[Mapping[str, torch.Tensor]]],
    teacher_taps: Sequence,
    device: str = "cpu",
    kind: str = "paper",
) -> Tuple[float, Dict[str, float]]:
    """``teacher_features`` {tap: [N, ...]} and ``teacher_taps`` (paired with ``student_taps``)
    of one teacher, or a list of each, one per teacher. ``kind``: one of ``REWARDS``: "paper"
    (the module docstring's R) or "calibrated", R with the CE after temperature scaling
    (``calibrated_ce``) in place of the plain CE. The metrics hold every term either way."""
    if kind not in REWARDS:
        raise ValueError(f"proxy_reward: expected kind one of {', '.join(REWARDS)}, got {kind!r}")
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
    metrics = {"val_ce": ce, "val_cka": cka, "val_acc": acc}
    if math.isfinite(ce):
        metrics["val_ce_ts"] = calibrated_ce(logits, labels)
    term = metrics["val_ce_ts"] if kind == "calibrated" and math.isfinite(ce) else ce
    raw = 1.0 - (term + (1.0 - cka))
    metrics["raw_reward"] = raw
    reward = max(raw, reward_floor(logits.shape[1])) if math.isfinite(raw) else raw
    return reward, metrics
