"""Distillation of a real student with a DistillerSpec (feature taps by forward hooks)."""

from autokd.distill.distiller import Distiller, DistillerOutput

__all__ = ["Distiller", "DistillerOutput"]
