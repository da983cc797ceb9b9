"""``DistillerSpec``: one complete distillation design, with YAML round trip and validation.

A spec is flat: one field per level of the search tree plus a few fixed settings. Operation
fields take a registry key or ``{key: ..., kwargs: {...}}``::

    name: cwd
    global_transform: original
    intra_spatial: original
    inter_spatial: channel-wise
    feature_distance: {key: kl, kwargs: {tau: 4.0}}
    feature_weight: 3.0
    logit_distance: none

Fields not given take their defaults (no feature or logit term, constant schedule). Unknown
fields, unknown keys, unknown kwargs and bad values are errors that name the field, the bad
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import yaml

from autokd.nn.registry import (
    FEATURE_DISTANCES,
    LOGIT_DISTANCES,
    SCHEDULES,
    TRANSFORM_STAGES,
    TRANSFORMS,
    stage_options,
)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

ADAPTER_MODES = ("auto", "always", "never")
LAYER_WEIGHTINGS = ("tf", "mean", "sum")
OP_FIELDS = (
    "global_transform",
    "intra_spatial",
    "inter_spatial",
    "feature_distance",
    "logit_distance",
    "schedule",
)
NUMBER_FIELDS = ("feature_weight", "temperature", "logit_weight")
CHOICE_FIELDS = {"adapter": ADAPTER_MODES, "layer_weighting": LAYER_WEIGHTINGS}


class SpecError(ValueError):
    """An invalid distiller spec: the message names the field, the value and what is allowed."""


def load_yaml(text: str, where: str, error=ValueError):
    """``yaml.safe_load(text)``, with malformed YAML and tags (``!!python/object``, which
    safe_load refuses to construct) raised as one-line ``error``s naming ``where`` and the
    line and column, not as yaml's multi-line exceptions."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        what = f"{context}: {problem}" if context else problem
        raise error(f"{where}: not valid YAML{at} ({what})") from None


@dataclass(frozen=True)
class OpChoice:
    """A registry key with constructor kwargs."""

    key: str
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def as_config(self) -> Dict[str, Any]:
        return {"key": self.key, "kwargs": dict(self.kwargs)}

    def to_plain(self):
        return self.key if not self.kwargs else {"key": self.key, "kwargs": dict(self.kwargs)}

    def __hash__(self):
        # list-valued kwargs (multi-scale grids, mlkd temperatures) hash as tuples
        return hash((self.key, tuple(sorted((k, _hashable(v)) for k, v in self.kwargs.items()))))


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def allowed_options(field_name: str):
    """The option names a spec field accepts (registry keys, plus "none" for distances)."""
    if field_name in TRANSFORM_STAGES:
        return stage_options(field_name)
    if field_name == "feature_distance":
        return ["none"] + FEATURE_DISTANCES.keys()
    if field_name == "logit_distance":
        return ["none"] + LOGIT_DISTANCES.keys()
    if field_name == "schedule":
        return SCHEDULES.keys()
    raise KeyError(field_name)


def _factory(field_name: str, key: str):
    if field_name in TRANSFORM_STAGES:
        return TRANSFORMS.get(f"{TRANSFORM_STAGES[field_name]}/{key}")
    reg = {
        "feature_distance": FEATURE_DISTANCES,
        "logit_distance": LOGIT_DISTANCES,
        "schedule": SCHEDULES,
    }[field_name]
    return reg.get(key)


_PLAIN_CACHE: Dict[tuple, OpChoice] = {}


def _parse_op(field_name: str, value: Any) -> OpChoice:
    # plain names are validated once per (field, name, registry size): specs are built by the
    # thousand during a search
    if isinstance(value, str):
        ck = (
            field_name,
            value,
            len(TRANSFORMS),
            len(FEATURE_DISTANCES),
            len(LOGIT_DISTANCES),
            len(SCHEDULES),
        )
        hit = _PLAIN_CACHE.get(ck)
        if hit is None:
            hit = _PLAIN_CACHE[ck] = _parse_op_uncached(field_name, value)
        return hit
    return _parse_op_uncached(field_name, value)


def _parse_op_uncached(field_name: str, value: Any) -> OpChoice:
    if isinstance(value, OpChoice):
        key, kwargs = value.key, dict(value.kwargs)
    elif isinstance(value, str):
        key, kwargs = value, {}
    elif isinstance(value, Mapping):
        unknown = set(value) - {"key", "kwargs"}
        if unknown or "key" not in value:
            raise SpecError(
                f"spec field {field_name!r}: expected a name or {{key: ..., kwargs: {{...}}}}, "
                f"got keys {sorted(map(str, value))}"
            )
        key, kwargs = value["key"], value.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise SpecError(
                f"spec field {field_name!r}: expected kwargs to be a mapping, got {kwargs!r}"
            )
        kwargs = dict(kwargs)
    else:
        raise SpecError(
            f"spec field {field_name!r}: expected a name or {{key: ..., kwargs: {{...}}}}, "
            f"got {value!r}"
        )
    allowed = allowed_options(field_name)
    if key not in allowed:
        raise SpecError(
            f"spec field {field_name!r}: invalid value {key!r}; allowed: {', '.join(allowed)}"
        )
    if key == "none":
        if kwargs:
            raise SpecError(
                f"spec field {field_name!r}: 'none' takes no kwargs, got {sorted(kwargs)}"
            )
        return OpChoice("none")
    factory = _factory(field_name, key)
    params = [p for p in inspect.signature(factory).parameters if p not in ("self", "channels")]
    bad = sorted(set(kwargs) - set(params))
    if bad:
        raise SpecError(
            f"spec field {field_name!r}: unknown kwargs {bad} for {key!r}; valid: "
            f"{', '.join(params) or '(none)'}"
        )
    try:  # the constructors check the kwargs' values
        factory(
            **kwargs,
            **({"channels": 1} if "channels" in inspect.signature(factory).parameters else {}),
        )
    except (ValueError, TypeError) as e:
        raise SpecError(f"spec field {field_name!r}: {e}") from None
    return OpChoice(key, kwargs)


def _parse_number(field_name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or value == float("inf")
    ):
        raise SpecError(
            f"spec field {field_name!r}: invalid value {value!r}; allowed: a finite number > 0"
        )
    return float(value)


@dataclass(frozen=True)
class DistillerSpec:
    """A complete KD design: L_KD = s(t) * (W_f * sum_q mu_q D_f(T_f(f_S^q, f_T^q))
    + W_p * D_p(p_S/tau, p_T/tau)).

    feature_distance "none" drops the feature term (logit-only designs such as KD and DIST);
    logit_distance "none" drops the logit term; both "none" is the student alone. ``adapter``:
    "auto" builds the student 1x1 conv + BN only when the design compares channels and the
    counts differ, "always" whenever it compares channels, "never" not at all.
    ``layer_weighting``: how several feature pairs (layers, teachers) combine: "tf" train-free
    mu_q (sum 1), "mean", "sum".
    """

    name: Optional[str] = None
    global_transform: OpChoice = OpChoice("original")
    intra_spatial: OpChoice = OpChoice("original")
    inter_spatial: OpChoice = OpChoice("original")
    feature_distance: OpChoice = OpChoice("none")
    feature_weight: float = 1.0
    logit_distance: OpChoice = OpChoice("none")
    temperature: float = 1.0
    logit_weight: float = 1.0
    schedule: OpChoice = OpChoice("constant")
    adapter: str = "auto"
    layer_weighting: str = "tf"

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DistillerSpec":
        if isinstance(data, DistillerSpec):
            return data
        if not isinstance(data, Mapping):
            raise SpecError(
                f"distiller spec: expected a mapping of fields, got {type(data).__name__}"
            )
        valid = cls.field_names()
        unknown = sorted(set(map(str, data)) - set(valid))
        if unknown:
            raise SpecError(
                f"distiller spec: unknown field(s) {unknown}; valid fields: {', '.join(valid)}"
            )
        values: Dict[str, Any] = {}
        for k, v in data.items():
            if k == "name":
                if v is not None and not isinstance(v, str):
                    raise SpecError(f"spec field 'name': expected a string, got {v!r}")
                values[k] = v
            elif k in OP_FIELDS:
                values[k] = _parse_op(k, v)
            elif k in NUMBER_FIELDS:
                values[k] = _parse_number(k, v)
            else:
                if v not in CHOICE_FIELDS[k]:
                    raise SpecError(
                        f"spec field {k!r}: invalid value {v!r}; "
                        f"allowed: {', '.join(CHOICE_FIELDS[k])}"
                    )
                values[k] = v
        spec = cls(**values)
        spec._check_coherence()
        return spec

    def _check_coherence(self):
        fd = self.feature_distance.key
        if fd != "none" and FEATURE_DISTANCES.get(fd).embedding:
            for f in TRANSFORM_STAGES:
                if getattr(self, f).key != "original":
                    raise SpecError(
                        f"spec field {f!r}: invalid value {getattr(self, f).key!r} "
                        f"with the embedding distance {fd!r} (it pools features to [N, C]); "
                        "allowed: original"
                    )

    @classmethod
    def from_yaml(cls, source: Union[str, os.PathLike]) -> "DistillerSpec":
        """From a YAML file path or YAML text. An empty document is an error: the student alone
        is the explicit ``none`` spec (``feature_distance: none``, ``logit_distance: none``)."""
        where = "distiller spec"
        if isinstance(source, os.PathLike) or (
            isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
        ):
            path = pathlib.Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"distiller spec: no such file {str(path)!r}")
            where = f"distiller spec {str(path)!r}"
            source = path.read_text()
        data = load_yaml(source, where, SpecError)
        if data is None:
            raise SpecError(
                f"{where}: empty, expected a mapping of spec fields (valid: "
                f"{', '.join(cls.field_names())}); for the student alone use the "
                "spec 'none'"
            )
        if not isinstance(data, Mapping):
            raise SpecError(
                f"{where}: expected a mapping of spec fields, got "
                f"{type(data).__name__} {data!r:.60}"
            )
        if where == "distiller spec":
            return cls.from_dict(data)
        try:
            return cls.from_dict(data)
        except SpecError as e:  # name the file the bad field is in
            msg = str(e)
            msg = msg[len("distiller spec: ") :] if msg.startswith("distiller spec: ") else msg
            raise SpecError(f"{where}: {msg}") from None

    @classmethod
    def coerce(cls, value) -> "DistillerSpec":
        """A spec from a spec, a mapping, YAML text or path, or a classic distiller's name."""
        if isinstance(value, DistillerSpec):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if (
            isinstance(value, str)
            and "\n" not in value
            and ":" not in value
            and not value.endswith((".yaml", ".yml"))
        ):
            return load_distiller(value)
        return cls.from_yaml(value)

    # -- output ---------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "name" and v is None:
                continue
            out[f.name] = v.to_plain() if isinstance(v, OpChoice) else v
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> "DistillerSpec":
        d = self.to_dict()
        d.update(changes)
        return DistillerSpec.from_dict(d)

    def uses_teacher(self) -> bool:
        """Whether the design has a term that reads the teacher (a feature or a logit distance);
        the student alone (``none``) has neither, and then nothing runs or reads the teacher."""
        return self.feature_distance.key != "none" or self.logit_distance.key != "none"

    def label(self) -> str:
        if self.name:
            return repr(self.name)
        parts = []
        if self.feature_distance.key != "none":
            parts.append(
                "/".join(getattr(self, f).key for f in TRANSFORM_STAGES)
                + f"/{self.feature_distance.key}x{self.feature_weight:g}"
            )
        if self.logit_distance.key != "none":
            parts.append(
                f"{self.logit_distance.key}(tau={self.temperature:g})x{self.logit_weight:g}"
            )
        return "[" + " + ".join(parts or ["no KD"]) + "]"


def list_distillers():
    """Names of the classic distillers shipped in configs/distillers/."""
    return sorted(p.stem for p in (CONFIG_DIR / "distillers").glob("*.yaml"))


def load_distiller(name: str) -> DistillerSpec:
    """A classic distiller's spec by name (configs/distillers/<name>.yaml)."""
    path = CONFIG_DIR / "distillers" / f"{name}.yaml"
    if not path.is_file():
        known = list_distillers()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown distiller {name!r}{hint} Known: {', '.join(known)}")
    return DistillerSpec.from_yaml(path)
