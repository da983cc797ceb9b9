"""End-to-end worth of multiscale_pool's specialised CPU paths: one Distiller training step
(student forward, CE + KD loss, backward; offline teacher features as in the search) with a
multi-scale design, each specialised path against the generic blocked path, 1 thread.

MEASUREMENT ONLY: this script drives the temporary AUTOKD_POOL_GENERIC switch of the commit
it was written in (csrc/ops/multiscale_pool_cpu.cpp); the switch is removed right after.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/studies/pool_paths_step.py [--rounds 21]

Every configuration is timed in interleaved rounds (all configurations once per round, each
sample ~0.1 s of steps, thread CPU time: the machine is shared and one thread's CPU time is
what a descheduling does not inflate), and each reports the median over rounds of its step
time divided by the generic path's step time in the same round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from autokd.distill import Distiller
from autokd.models import build_model
from autokd.ops import multiscale_pool
from autokd.space import DistillerSpec

ALL = "s8x8,ssmall,l32x32,llarge,pf32,chlast,bsmall"
# Paths of the forward (and the one specialised backward): AUTOKD_POOL_GENERIC lists the paths
# bypassed; "generic" bypasses all of them.
PATHS = {
    "s8x8": "8x8 vector kernel (planes_8x8)",
    "ssmall": "other unrolled small planes (small_nested_planes)",
    "l32x32": "32x32 vector kernel (planes_32x32)",
    "llarge": "unrolled large planes (large_nested_planes)",
    "pf32": "float32 per-plane kernel (pool_planes_f32)",
    "chlast": "channels-last kernel (forward_channels_last)",
    "bsmall": "unrolled small-plane backward",
}

DESIGN = {"global_transform": "original", "intra_spatial": "multi-scale",
          "inter_spatial": "sample-wise", "feature_distance": "l2", "feature_weight": 5,
          "logit_distance": "kl", "temperature": 4, "logit_weight": 1}

# name: (student, teacher, taps, input [C, H, W], classes, batch, channels_last)
SCENARIOS = {
    "digits_student<-digits_teacher, features [16,4,4]":
        ("digits_student", "digits_teacher", ["features"], (1, 8, 8), 10, 32, False),
    "resnet20<-resnet56, layer3 [64,8,8]":
        ("resnet20", "resnet56", ["layer3"], (3, 32, 32), 100, 64, False),
    "resnet8x4<-resnet32x4, layer3 [256,8,8]":
        ("resnet8x4", "resnet32x4", ["layer3"], (3, 32, 32), 100, 64, False),
    "resnet20<-resnet56, layer1-3 [16,32,32] [32,16,16] [64,8,8]":
        ("resnet20", "resnet56", ["layer1", "layer2", "layer3"], (3, 32, 32), 100, 64, False),
    "resnet20<-resnet56 channels_last, layer1-3":
        ("resnet20", "resnet56", ["layer1", "layer2", "layer3"], (3, 32, 32), 100, 64, True),
}


def build(student, teacher, taps, shape, classes, batch, channels_last):
    torch.manual_seed(0)
    model = build_model(student, num_classes=classes, in_channels=shape[0])
    tmodel = build_model(teacher, num_classes=classes, in_channels=shape[0]).eval()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    tmodel = tmodel.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    feats = {}
    hooks = [tmodel.get_submodule(t).register_forward_hook(
        lambda m, i, o, t=t: feats.__setitem__(t, o.detach())) for t in taps]
    with torch.no_grad():
        tl = tmodel(x)
    for h in hooks:
        h.remove()
    shapes = {t: tuple(v.shape[1:]) for t, v in feats.items()}
    shapes["logits"] = (classes,)
    d = Distiller(DistillerSpec.coerce(DESIGN), model, taps, teacher_shapes=shapes,
                  example_input=x[:2])

    def step():
        d.zero_grad(set_to_none=True)
        out = d(x, teacher_features=feats, teacher_logits=tl)
        (F.cross_entropy(out.student_logits, y) + out.loss_kd).backward()

    def pool_only():
        # The op's share of the step: the student-side pool (forward + backward) and the
        # teacher-side one (forward) on tensors of the teacher taps' shapes (an adapter maps
        # the student to the teacher's channels before the transform).
        for t in taps:
            f = feats[t]
            s = f.detach().clone().requires_grad_(True)
            multiscale_pool(s, (1, 2, 4)).sum().backward()
            multiscale_pool(f, (1, 2, 4))

    return step, pool_only


def configs():
    """name -> AUTOKD_POOL_GENERIC value: default (every path on), generic (all off), and each
    path alone on top of the generic one."""
    out = {"default": "", "generic": ALL}
    for p in PATHS:
        out[f"only {p}"] = ",".join(q for q in PATHS if q != p)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--only", default=None, help="substring of the scenarios to run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfgs = configs()
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds; design "
          f"{DESIGN}")
    for name, sc in SCENARIOS.items():
        if args.only and args.only not in name:
            continue
        step, pool_only = build(*sc)
        for _ in range(3):
            step()
        # Steps per sample: about 0.1 s of them, so that one sample is not one time slice.
        t0 = time.thread_time()
        step()
        reps = max(1, round(0.1 / max(time.thread_time() - t0, 1e-6)))
        times = {c: [] for c in cfgs}
        pool = {c: [] for c in cfgs}
        for _ in range(args.rounds):
            for c, env in cfgs.items():
                os.environ["AUTOKD_POOL_GENERIC"] = env
                step()  # the first step after a switch warms that path's code and tables
                t0 = time.thread_time()
                for _ in range(reps):
                    step()
                t1 = time.thread_time()
                for _ in range(reps):
                    pool_only()
                pool[c].append((time.thread_time() - t1) / reps)
                times[c].append((t1 - t0) / reps)
        os.environ.pop("AUTOKD_POOL_GENERIC", None)
        gen = times["generic"]
        print(f"\n### {name} (batch {sc[5]}, {reps} steps per sample)\n")
        print("| configuration | median step ms | step vs generic (median of paired ratios) | IQR "
              "| pool calls alone, median ms |")
        print("|---|---|---|---|---|")
        for c, ts in times.items():
            r = sorted(a / b for a, b in zip(ts, gen))
            q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
            print(f"| {c} | {1e3 * statistics.median(ts):.3f} | {statistics.median(r):.4f} | "
                  f"{q1:.4f}-{q3:.4f} | {1e3 * statistics.median(pool[c]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
