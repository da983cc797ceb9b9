"""Models by name, and the feature taps distillation reads from them.

Four kinds of names:
- a zoo name (``resnet20``, ``wrn_40_2``, ``digits_teacher``, ``vit_compact``, ...; see
  ``list_models()``);
- ``tv:<name>``: a torchvision model built with ``weights=None`` (nothing is downloaded); its
  first convolution is rebuilt when the data does not have 3 channels;
- ``timm:<name>``: a timm model, ``pretrained=False`` always, with ``num_classes`` and
  ``in_chans`` of the data, its final features exposed as a map at the tap ``token_map``
  (ViT tokens reshaped to the patch grid, see ``autokd.models.vit``);
- ``package.module:factory`` (or ``path/to/file.py:factory``): the user's own factory, called
  as ``factory(num_classes=..., in_channels=...)`` and expected to return an ``nn.Module``.

Any name may end in ``?key=value&key=value``: keyword arguments for the constructor (numbers,
true/false, or text), e.g. ``timm:vit_tiny_patch16_224?img_size=32&patch_size=4`` or
``vit_compact?patch_size=4``; zoo CNNs take none.

``default_taps(name)`` gives the module paths (as in ``named_modules()``) whose outputs are the
distilled features: the last stage before global pooling (``token_map`` for ViTs and timm).
``training_defaults(name)`` gives the optimizer settings a model trains with when the user sets
none: SGD for CNNs, AdamW with warm-up for transformers.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from autokd.errors import PipelineError
from autokd.models import cifar, digits, vit
from autokd.registry import Registry

__all__ = [
    "MODELS",
    "build_model",
    "check_model_fits",
    "count_parameters",
    "default_taps",
    "is_transformer",
    "list_models",
    "split_name",
    "training_defaults",
]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_TAPS = {}
_OPTIONS = {}  # zoo name -> the constructor keywords a name's ?query may set
_TRANSFORMERS = set()

# AdamW with linear warm-up then cosine, as ViTs are trained (DeiT: lr 5e-4 x batch/512, wd
# 0.05, 5 warm-up epochs of 300); lr 1e-3 suits the small batches of CPU runs. SGD at the CNN
# schedule's rates does not train a ViT from scratch.
TRANSFORMER_TRAINING = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "warmup_epochs": 5.0,
}


def _zoo(
    name: str, taps: Sequence[str], make: Callable[..., nn.Module], options: Sequence[str] = ()
) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
        return make(num_classes, in_channels, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"Zoo model {name!r}; default taps {list(taps)}."
    MODELS.register(name, factory)
    _TAPS[name] = list(taps)
    _OPTIONS[name] = list(options)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _zoo(
        f"resnet{_depth}",
        ["layer3"],
        lambda nc, ic, d=_depth: cifar.CifarResNet(d, (16, 16, 32, 64), nc, ic),
    )
for _depth in (8, 32):
    _zoo(
        f"resnet{_depth}x4",
        ["layer3"],
        lambda nc, ic, d=_depth: cifar.CifarResNet(d, (32, 64, 128, 256), nc, ic),
    )
for _depth, _widen in ((16, 2), (40, 2)):
    # The final BN-ReLU belongs to the last stage of a pre-activation network.
    _zoo(
        f"wrn_{_depth}_{_widen}",
        ["bn"],
        lambda nc, ic, d=_depth, k=_widen: cifar.WideResNet(d, k, nc, ic),
    )
_zoo("vgg8", ["block4"], lambda nc, ic: cifar.CifarVGG([[64], [128], [256], [512], [512]], nc, ic))
_zoo(
    "vgg13",
    ["block4"],
    lambda nc, ic: cifar.CifarVGG(
        [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], nc, ic
    ),
)
_zoo("mobilenetv2", ["conv2"], lambda nc, ic: cifar.CifarMobileNetV2(nc, ic, width=0.5))
_zoo("shufflenetv1", ["layer3"], lambda nc, ic: cifar.ShuffleNetV1(nc, ic))
_zoo("shufflenetv2", ["conv2"], lambda nc, ic: cifar.ShuffleNetV2(nc, ic))
_zoo(
    "digits_teacher",
    ["features"],
    lambda nc, ic, **kw: digits.DigitsTeacher(nc, ic, **kw),
    ("width",),
)
_zoo(
    "digits_student",
    ["features"],
    lambda nc, ic, **kw: digits.DigitsStudent(nc, ic, **kw),
    ("width",),
)
_VIT_OPTIONS = ("img_size", "patch_size", "dim", "depth", "heads", "mlp_ratio")
# ~0.2M parameters: 8x8 digits in 2x2 patches (a 4x4 token grid, the digits CNNs' tap size);
# for 32x32 images use vit_compact?patch_size=4 (an 8x8 grid)
_zoo(
    "vit_compact",
    ["token_map"],
    lambda nc, ic, **kw: vit.VisionTransformer(
        nc,
        ic,
        **{
            "img_size": 8,
            "patch_size": 2,
            "dim": 64,
            "depth": 6,
            "heads": 4,
            "mlp_ratio": 2.0,
            **kw,
        },
    ),
    _VIT_OPTIONS,
)
# DeiT-Tiny's width and depth (dim 192, 12 blocks, 3 heads; 5.4M parameters) on 32x32 images
# in 4x4 patches (an 8x8 grid)
_zoo(
    "vit_tiny",
    ["token_map"],
    lambda nc, ic, **kw: vit.VisionTransformer(
        nc,
        ic,
        **{
            "img_size": 32,
            "patch_size": 4,
            "dim": 192,
            "depth": 12,
            "heads": 3,
            "mlp_ratio": 4.0,
            **kw,
        },
    ),
    _VIT_OPTIONS,
)
_TRANSFORMERS.update({"vit_compact", "vit_tiny"})


def list_models() -> List[str]:
    """Zoo names (``tv:<name>``, ``timm:<name>`` and ``module:factory`` names are accepted
    besides these)."""
    return MODELS.keys()


def _option_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_name(name: str) -> Tuple[str, Dict[str, object]]:
    """``"timm:vit_tiny_patch16_224?img_size=32&patch_size=4"`` -> (``"timm:vit_tiny_patch16_224"``,
    ``{"img_size": 32, "patch_size": 4}``); values are ints, floats, true/false or text."""
    base, sep, query = name.partition("?")
    options: Dict[str, object] = {}
    if sep:
        for part in query.split("&"):
            key, eq, value = part.partition("=")
            if not key or not eq or not value:
                raise ValueError(
                    f"model {name!r}: expected options as '?key=value&key=value', got {part!r}"
                )
            if key in options:
                raise ValueError(f"model {name!r}: option {key!r} given twice")
            options[key] = _option_value(value)
    return base, options


def is_transformer(name: str) -> bool:
    """Whether a model name trains with the transformer recipe (the zoo's ViTs, every
    ``timm:`` model): AdamW with warm-up, and on small data a longer proxy trial
    (autokd.pipeline.default_proxy)."""
    base, _ = split_name(name)
    return base in _TRANSFORMERS or base.startswith("timm:")


def training_defaults(name: str, epochs: Optional[int] = None) -> Dict[str, object]:
    """TrainConfig fields a model trains with unless the user sets them: {} (the data set's SGD
    schedule) for CNNs; AdamW, lr 1e-3, weight decay 0.05 and a warm-up of 5 epochs (at most
    a tenth of ``epochs`` when given) for the zoo's ViTs and every ``timm:`` model (timm's
    recipes train its models with AdamW)."""
    if is_transformer(name):
        out = dict(TRANSFORMER_TRAINING)
        if epochs is not None:
            out["warmup_epochs"] = min(out["warmup_epochs"], 0.1 * epochs)
        return out
    return {}


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
    base, options = split_name(name)
    if base.startswith("tv:"):
        return _build_torchvision(base[3:], num_classes, in_channels, options)
    if base.startswith("timm:"):
        return _build_timm(base[5:], num_classes, in_channels, options, name)
    if ":" in base:
        return _build_user(base, num_classes, in_channels, options)
    factory = MODELS.get(base)
    bad = sorted(set(options) - set(_OPTIONS[base]))
    if bad:
        valid = ", ".join(_OPTIONS[base]) or "none"
        raise ValueError(f"model {name!r}: unknown option(s) {bad} for {base!r}; valid: {valid}")
    return factory(num_classes=num_classes, in_channels=in_channels, **options)


def check_model_fits(model: torch.nn.Module, name: str, data, role: str) -> None:
    """A forward pass of two training images through ``model`` (eval mode, no grad): images too
    small for the model (or of a layout it cannot take) fail here, before any training, with
    the model and the image size named instead of a traceback from deep inside a layer."""
    x = data.train.images[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        c, h, w = x.shape[1:]
        raise PipelineError(
            f"{role} {name} cannot take the {c}x{h}x{w} images of {data.spec} ({first}); use "
            "larger images or a model made for this size"
        ) from None
    finally:
        model.train(was_training)


def default_taps(name: str, model: Optional[nn.Module] = None) -> List[str]:
    """Module paths whose outputs are the distilled features by default.

    For ``tv:`` models the taps are found by running a 112x112 input through ``model`` (built
    with 10 classes and 3 channels when not given) and keeping the last direct child that
    outputs a [N, C, H, W] map before global pooling.
    """
    base, _ = split_name(name)
    if base.startswith("timm:"):
        return ["token_map"]
    if base.startswith("tv:"):
        if model is None:
            model = build_model(name, num_classes=10, in_channels=3)
        return [_last_spatial_child(name, model)]
    if ":" in base:
        raise ValueError(
            f"model {name!r} is the user's own: it has no default feature taps; give the taps "
            f"explicitly as module paths from named_modules() (e.g. 'layer3')"
        )
    MODELS.get(base)  # unknown names raise with close matches
    return list(_TAPS[base])


# ------------------------------------------------------------------------------ torchvision


def _build_torchvision(
    arch: str, num_classes: int, in_channels: int, options: Optional[Dict[str, object]] = None
) -> nn.Module:
    try:
        import torchvision  # lazy: ~1.7 s to import, and only tv: names need it
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
    _check_no_weights(f"tv:{arch}", options)
    kwargs.update(options or {})
    try:
        model = torchvision.models.get_model(arch, **kwargs)
    except TypeError as e:
        raise ValueError(
            f"model 'tv:{arch}': torchvision cannot build it with options {options}: {e}"
        ) from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, arch)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int, arch: str) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                break
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                1,
                module.bias is not None,
                module.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, new)
            return
    raise ValueError(
        f"model 'tv:{arch}': cannot adapt it to {in_channels} input channels (no plain first "
        f"Conv2d found); use 3-channel data or a model of your own"
    )


_POOLING = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Linear,
)


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


# ------------------------------------------------------------------------------------- timm

_WEIGHT_OPTIONS = (
    "pretrained",
    "weights",
    "weights_backbone",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
)


def _check_no_weights(name: str, options: Optional[Dict[str, object]]) -> None:
    given = sorted(set(options or {}) & set(_WEIGHT_OPTIONS))
    if given:
        raise ValueError(
            f"model {name!r}: option(s) {given} would load or download weights; "
            "autokd builds models randomly initialised (load trained weights with "
            "a checkpoint instead)"
        )


def _build_timm(
    arch: str, num_classes: int, in_channels: int, options: Dict[str, object], full: str
) -> nn.Module:
    try:
        import timm  # lazy: an optional dependency (pip install 'autokd[timm]')
    except ImportError:
        raise ImportError(f"model {full!r} needs timm: pip install 'autokd[timm]'") from None
    if not timm.is_model(arch):
        known = timm.list_models()
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise KeyError(
            f"unknown timm model 'timm:{arch}'{hint} ({len(known)} known: see timm.list_models())"
        )
    _check_no_weights(full, options)
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"model {full!r}: timm cannot build it ({type(e).__name__}: {first})"
        ) from None
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(
            f"model {full!r}: expected a timm classifier with forward_features and forward_head"
        )
    return vit.TimmFeatures(model)


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


def _build_user(
    name: str, num_classes: int, in_channels: int, options: Optional[Dict[str, object]] = None
) -> nn.Module:
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
    options = dict(options or {})
    try:
        inspect.signature(factory).bind(num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError:
        extra = f" and the options {sorted(options)}" if options else ""
        raise TypeError(
            f"model {name!r}: the factory must accept keyword arguments num_classes= and "
            f"in_channels={extra}; its signature is {attr}{inspect.signature(factory)}"
        ) from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    model = factory(num_classes=num_classes, in_channels=in_channels, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model {name!r}: the factory returned {type(model).__name__}, expected an nn.Module"
        )
    return model
