"""The house rule of one name per op everywhere: every forward op in torch.ops.autokd has its
wrapper, eager reference, CPU and CUDA sources, test file and benchmark."""

import pathlib

import pytest

import autokd

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = autokd.ops.op_names()


def test_ops_exist():
    assert OPS, "no autokd ops registered"


@pytest.mark.parametrize("op", OPS)
def test_op_has_every_piece(op):
    missing = []
    if not hasattr(autokd.ops, op):
        missing.append(f"autokd.ops.{op}")
    if not hasattr(autokd.reference, op):
        missing.append(f"autokd.reference.{op}")
    for rel in (
        f"csrc/ops/{op}_cpu.cpp",
        f"csrc/ops/{op}_cuda.cu",
        f"tests/ops/test_{op}.py",
        f"benchmarks/bench_{op}.py",
    ):
        if not (ROOT / rel).is_file():
            missing.append(rel)
    assert not missing, f"op {op} lacks: {', '.join(missing)}"
