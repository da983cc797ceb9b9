"""Models by name, and the feature taps distillation reads from them.

Three kinds of names:
- a zoo name (``resnet20``, ``wrn_40_2``, ``digits_teacher``, ...; see ``list_models()``);
- ``tv:<name>``: a torchvision model built with ``weights=None`` (nothing is downloaded); its
  first convolution is rebuilt when the data does not have 3 channels;
- ``package.module:factory`` (or ``path/to/file.py:factory``): the user's own factory, called
  as ``factory(num_classes=..., in_channels=...)`` and expected to return an ``nn.Module``.

``default_taps(name)`` gives the module paths (as in ``named_modules()``) whose outputs are the
distilled features: the last stage before global pooling.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from autokd.models import cifar, digits
from autokd.registry import Registry

__all__ = ["MODELS", "build_model", "default_taps", "list_models", "count_parameters"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_TAPS = {}


def _zoo(name: str, taps: Sequence[str], make: Callable[[int, int], nn.Module]) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return make(num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = f"Zoo model {name!r}; default taps {list(taps)}."
    MODELS.register(name, factory)
    _TAPS[name] = list(taps)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _zoo(f"resnet{_depth}", ["layer3"],
         lambda nc, ic, d=_depth: cifar.CifarResNet(d, (16, 16, 32, 64), nc, ic))
for _depth in (8, 32):
    _zoo(f"resnet{_depth}x4", ["layer3"],
         lambda nc, ic, d=_depth: cifar.CifarResNet(d, (32, 64, 128, 256), nc, ic))
for _depth, _widen in ((16, 2), (40, 2)):
    # The final BN-ReLU belongs to the last stage of a pre-activation network.
    _zoo(f"wrn_{_depth}_{_widen}", ["bn"],
         lambda nc, ic, d=_depth, k=_widen: cifar.WideResNet(d, k, nc, ic))
_zoo("vgg8", ["block4"], lambda nc, ic: cifar.CifarVGG([[64], [128], [256], [512], [512]], nc, ic))
_zoo("vgg13", ["block4"], lambda nc, ic: cifar.CifarVGG(
    [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], nc, ic))
_zoo("mobilenetv2", ["conv2"], lambda nc, ic: cifar.CifarMobileNetV2(nc, ic, width=0.5))
_zoo("shufflenetv1", ["layer3"], lambda nc, ic: cifar.ShuffleNetV1(nc, ic))
_zoo("shufflenetv2", ["conv2"], lambda nc, ic: cifar.ShuffleNetV2(nc, ic))
_zoo("digits_teacher", ["features"], lambda nc, ic: digits.DigitsTeacher(nc, ic))
_zoo("digits_student", ["features"], lambda nc, ic: digits.DigitsStudent(nc, ic))


def list_models() -> List[str]:
    """Zoo names (``tv:<name>`` and ``module:factory`` names are accepted besides these)."""
    return MODELS.keys()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a model by name (zoo, ``tv:<name>`` or ``module:factory``), randomly initialised."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model: expected a non-empty name, got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"model {name!r}: expected num_classes >= 1, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"model {name!r}: expected in_channels >= 1, got {in_channels!r}")
    if name.startswith("tv:"):
        return _build_torchvision(name[3:], num_classes, in_channels)
    if ":" in name:
        return _build_user(name, num_classes, in_channels)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def default_taps(name: str, model: Optional[nn.Module] = None) -> List[str]:
    """Module paths whose outputs are the distilled features by default.

    For ``tv:`` models the taps are found by running a 112x112 input through ``model`` (built
    with 10 classes and 3 channels when not given) and keeping the last direct child that
    outputs a [N, C, H, W] map before global pooling.
    """
    if name.startswith("tv:"):
        if model is None:
            model = build_model(name, num_classes=10, in_channels=3)
        return [_last_spatial_child(name, model)]
    if ":" in name:
        raise ValueError(
            f"model {name!r} is the user's own: it has no default feature taps; give the taps "
            f"explicitly as module paths from named_modules() (e.g. 'layer3')"
        )
    MODELS.get(name)  # unknown names raise with close matches
    return list(_TAPS[name])


# ------------------------------------------------------------------------------ torchvision


def _build_torchvision(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - torchvision is a requirement
        raise ImportError(f"model 'tv:{arch}' needs torchvision, which is not installed") from e
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join('tv:' + c for c in close)}?" if close else ""
        raise KeyError(f"unknown torchvision model 'tv:{arch}'{hint} Known: {', '.join(known)}")
    kwargs = {"weights": None, "num_classes": num_classes}
    if arch.startswith("inception") or arch == "googlenet":
        # Auxiliary heads change the output type in training mode; distillation wants logits.
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(arch, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, arch)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int, arch: str) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                break
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, 1, module.bias is not None,
                            module.padding_mode)
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, new)
            return
    raise ValueError(
        f"model 'tv:{arch}': cannot adapt it to {in_channels} input channels (no plain first "
        f"Conv2d found); use 3-channel data or a model of your own"
    )


_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten,
            nn.Dropout, nn.Linear)


def _last_spatial_child(name: str, model: nn.Module) -> str:
    outputs = {}
    hooks = []
    for child_name, child in model.named_children():
        if isinstance(child, _POOLING):
            continue

        def hook(_m, _inp, out, key=child_name):
            spatial = isinstance(out, torch.Tensor) and out.dim() == 4
            if spatial and out.shape[-1] * out.shape[-2] > 1:
                outputs[key] = len(outputs)

        hooks.append(child.register_forward_hook(hook))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, 112, 112))
    except Exception as e:  # e.g. models that accept one input size only
        raise ValueError(
            f"model {name!r}: cannot find its default feature taps by running a 112x112 input "
            f"({type(e).__name__}: {e}); give the taps explicitly as module paths from "
            f"named_modules()"
        ) from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not outputs:
        raise ValueError(
            f"model {name!r} has no stage with a [N, C, H, W] output among its direct children; "
            f"give the feature taps explicitly as module paths from named_modules()"
        )
    return max(outputs, key=outputs.get)


# ------------------------------------------------------------------------------- user models


def _import_module(module_name: str, full: str):
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"model {full!r}: file {module_name!r} does not exist")
        mod_name = "_autokd_user_" + os.path.splitext(os.path.basename(module_name))[0]
        spec = importlib.util.spec_from_file_location(mod_name, module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Console scripts do not put the working directory on sys.path; a user's module next to
        # their config is the common case, so look there once.
        cwd = os.getcwd()
        if cwd not in sys.path and e.name and module_name.split(".")[0] == e.name.split(".")[0]:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                pass
        raise ImportError(
            f"model {full!r}: cannot import module {module_name!r} ({e}); expected an importable "
            f"'package.module:factory' or 'path/to/file.py:factory'"
        ) from None


def _build_user(name: str, num_classes: int, in_channels: int) -> nn.Module:
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"model {name!r}: expected 'package.module:factory', got {name!r}")
    module = _import_module(module_name, name)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        candidates = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        close = difflib.get_close_matches(attr, candidates, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        what = "is not callable" if factory is not None else "not found"
        raise AttributeError(f"model {name!r}: factory {attr!r} {what} in {module_name!r}{hint}")
    try:
        inspect.signature(factory).bind(num_classes=num_classes, in_channels=in_channels)
    except TypeError:
        raise TypeError(
            f"model {name!r}: the factory must accept keyword arguments num_classes= and "
            f"in_channels=; its signature is {attr}{inspect.signature(factory)}"
        ) from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    model = factory(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: the factory returned {type(model).__name__}, "
                        f"expected an nn.Module")
    return model
