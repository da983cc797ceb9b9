"""Feature taps: forward hooks that keep the latest outputs of named modules of a model.

Used wherever autokd reads a model's intermediate features: the Distiller (student and
teachers), the feature store build (teacher), and ``autokd.train.loop.forward_all``. One class,
so one tap syntax and one message for a tap that names no module.

A tap is a module path as ``model.named_modules()`` spells it (``"layer3"``,
``"backbone.body.layer4"``), optionally followed by ``:KEY`` to pick one entry of a module whose
output is a dict, list or tuple: torchvision's ``backbone`` of a Faster R-CNN (an FPN) returns an
OrderedDict of maps keyed "0", "1", "2", "3", "pool", so ``"backbone:0"`` is the finest FPN
level; ``"encoder:-1"`` is the last entry of a list output. Keys go down one level at a time
(``"m:a:0"``). A path that exists as a module name (rare names that contain ``:``) is taken as
it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["FeatureTaps", "find_module", "parse_tap"]


def parse_tap(tap: str, modules: Mapping[str, nn.Module]) -> tuple[str, tuple[str, ...]]:
    """(module path, keys) of a tap string, given ``dict(model.named_modules())``."""
    if tap in modules:
        return tap, ()
    path, *keys = tap.split(":")
    return path, tuple(keys)


def _no_module_message(
    model: nn.Module, tap: str, path: str, who: str, modules: Mapping[str, nn.Module]
) -> str:
    known = [k for k in modules if k]
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
    # the shallowest paths first: the stages a user most likely meant
    shown = sorted(known, key=lambda k: (k.count("."), known.index(k)))[:12]
    more = ", ..." if len(known) > len(shown) else ""
    listing = (
        (
            f" Module paths: {', '.join(shown)}{more} ({len(known)} in all, as named_modules() "
            "lists them)"
        )
        if known
        else " It has no submodules."
    )
    keyed = f" (tap {tap!r}: module path, then ':KEY' entries of its output)" if tap != path else ""
    return f"{who}: {path!r}{keyed} names no module of {type(model).__name__}{hint}{listing}"


def find_module(model: nn.Module, tap: str, who: str = "model") -> nn.Module:
    """The module a tap hooks; ValueError naming the tap, close matches and valid paths."""
    if not isinstance(tap, str) or not tap:
        raise ValueError(f"{who}: expected a tap as a non-empty module path string, got {tap!r}")
    modules = dict(model.named_modules())
    path, _ = parse_tap(tap, modules)
    if path not in modules or path == "":
        raise ValueError(_no_module_message(model, tap, path, who, modules))
    return modules[path]


def _describe(value) -> str:
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value.keys())}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _select(output, keys: Sequence[str], tap: str, path: str, who: str):
    value = output
    for depth, key in enumerate(keys):
        here = ":".join([path, *keys[:depth]])
        if isinstance(value, Mapping):
            if key in value:
                value = value[key]
                continue
            try:
                ikey = int(key)
            except ValueError:
                ikey = None
            if ikey is not None and ikey in value:
                value = value[ikey]
                continue
            raise ValueError(
                f"{who}: tap {tap!r}: {here!r} returned {_describe(value)}; no key {key!r}"
            )
        if isinstance(value, (list, tuple)):
            try:
                value = value[int(key)]
            except (ValueError, IndexError):
                raise ValueError(
                    f"{who}: tap {tap!r}: {here!r} returned {_describe(value)}; "
                    f"expected an index in [-{len(value)}, {len(value) - 1}], got "
                    f"{key!r}"
                ) from None
            continue
        raise ValueError(
            f"{who}: tap {tap!r}: {here!r} returned {_describe(value)}, which has no "
            f"entries to pick with {key!r}"
        )
    if not isinstance(value, torch.Tensor):
        hint = ""
        if isinstance(value, Mapping) and value:
            hint = f"; pick one entry, e.g. {':'.join([path, *keys, str(next(iter(value)))])!r}"
        elif isinstance(value, (list, tuple)) and value:
            hint = f"; pick one entry, e.g. {':'.join([path, *keys, '0'])!r}"
        # a wrong tap choice, like a wrong path: ValueError, which the CLI prints as one line
        raise ValueError(  # noqa: TRY004
            f"{who}: tap {tap!r} gave {_describe(value)}, expected a tensor{hint}"
        )
    return value


class FeatureTaps:
    """Forward hooks on ``model`` that keep the latest output of each tap (see the module
    docstring for the tap syntax).

    ``outputs`` holds the tensors of the latest forward, by tap; ``take()`` returns them and
    starts afresh. A tap that names no module is a ValueError at construction; a tap whose
    output is not a tensor (and has no ``:KEY``) is a ValueError from the forward that made it.
    ``who`` ("student", "teacher 0", "autokd store build: teacher") starts every message. Use
    ``remove()`` (or ``with FeatureTaps(...)``) to take the hooks off again.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str], who: str = "model"):
        if isinstance(taps, str):
            taps = [taps]
        # a tap named twice (one student layer paired with two teacher layers) is hooked once
        self.taps = list(dict.fromkeys(taps))
        self.who = who
        modules = dict(model.named_modules())
        by_path: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for tap in self.taps:
            find_module(model, tap, who)
            path, keys = parse_tap(tap, modules)
            by_path.setdefault(path, []).append((tap, keys))
        self.outputs: dict[str, torch.Tensor] = {}
        # one hook per module, however many entries of its output are tapped
        self._handles = [
            modules[p].register_forward_hook(self._hook(p, entries))
            for p, entries in by_path.items()
        ]

    def _hook(self, path: str, entries):
        def hook(_module, _inputs, output):
            for tap, keys in entries:
                self.outputs[tap] = _select(output, keys, tap, path, self.who)

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs of the latest forward, by tap; the next call starts empty."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
