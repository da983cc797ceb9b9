"""Distil a torchvision Faster R-CNN (FPN) student from a Faster R-CNN teacher with autokd.

    python examples/detection_distill.py                  # 20 steps on 128x128 synthetic images
    python examples/detection_distill.py --steps 2 --image-size 64

Student: Faster R-CNN with a MobileNetV3-Large FPN; teacher: Faster R-CNN with a ResNet-50 FPN.
Both are randomly initialised (``weights=None, weights_backbone=None``: nothing is downloaded)
and the images are synthetic (a bright rectangle on noise, its box the one object), so this
shows the wiring, not accuracy. With real models: load the teacher's trained weights, feed your
data, keep the rest.

What autokd adds to the detector's own training step:
- ``autokd.Distiller`` hooks FPN levels by tap: ``"backbone:0"`` is entry "0" of the dict the
  FPN backbone returns. The student's stride-32 level "0" is paired with the teacher's stride-32
  level "3", and the two "pool" levels with each other (both 256 channels).
- The design is feature-only (a detector has no class logits [N, K] to distil): channel-wise
  distillation (``cwd``: per channel a softmax over positions, KL at tau 4), the usual choice for
  dense prediction. Any design of the search space without a logit term works the same way.
- ``d(images, targets)`` runs the student as ``student(images, targets)`` (train mode: its dict
  of losses, in ``out.student_output``) and the teacher on ``images`` (eval mode, no_grad); the
  step minimises the detector's losses plus ``out.loss_kd``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torchvision.models import detection

from autokd.distill import Distiller

STUDENT_TAPS = ["backbone:0", "backbone:pool"]
TEACHER_TAPS = ["backbone:3", "backbone:pool"]


def synthetic_batch(n: int, size: int, num_classes: int, g: torch.Generator):
    """n images [3, size, size] (noise plus one bright rectangle) and their targets."""
    images, targets = [], []
    for _ in range(n):
        img = 0.1 * torch.rand(3, size, size, generator=g)
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        x0 = int(torch.randint(0, size - w, (1,), generator=g))
        y0 = int(torch.randint(0, size - h, (1,), generator=g))
        label = int(torch.randint(1, num_classes, (1,), generator=g))
        img[:, y0 : y0 + h, x0 : x0 + w] += 0.5 + 0.4 * label / num_classes
        images.append(img)
        targets.append(
            {
                "boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                "labels": torch.tensor([label]),
            }
        )
    return images, targets


def build_models(image_size: int, num_classes: int):
    """(student, teacher), randomly initialised; images are used at their own size."""
    size = {"min_size": image_size, "max_size": image_size}
    student = detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, **size
    )
    teacher = detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, **size
    )
    return student, teacher


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=3, help="object classes + background")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    student, teacher = build_models(args.image_size, args.classes)
    example, _ = synthetic_batch(2, args.image_size, args.classes, g)
    d = Distiller(
        "cwd",
        student,
        STUDENT_TAPS,
        teacher_taps=TEACHER_TAPS,
        teacher=teacher,
        example_input=example,
    )
    # the student's parameters and the design's (none for cwd at equal channels); never the
    # teacher's
    optimizer = torch.optim.SGD(d.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    d.train()
    history = []
    for step in range(args.steps):
        d.set_progress(step / args.steps)
        images, targets = synthetic_batch(args.batch, args.image_size, args.classes, g)
        out = d(images, targets)
        det = sum(out.student_output.values())  # the detector's own losses
        loss = det + out.loss_kd
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss became {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        det, kd = float(det.detach()), float(out.loss_kd.detach())
        history.append({"step": step, "detector": det, "kd": kd})
        print(f"step {step:3d}  detector loss {det:.4f}  kd loss {kd:.4f}")
    d.remove_hooks()
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
