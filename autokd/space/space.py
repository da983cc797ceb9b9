"""The search tree as data: ordered levels of named options with dependencies.

A space file (configs/spaces/*.yaml)::

    name: autokd
    levels:
      - {name: global_transform, options: [original, attention, mask]}
      ...
      - {name: temperature, options: [1, 2, 4, 8], requires: {logit_distance: [kl, pearson]}}
    fixed: {adapter: auto}        # spec fields every design shares (optional)

Level names are ``DistillerSpec`` fields; options are that field's values written as strings
(numbers in their shortest form: "0.1", "5"). A level exists in a design only when every
earlier level named in its ``requires`` took one of the listed options; a design is one option
per existing level, and ``spec_from_design`` turns it into a spec (absent levels keep the
spec's defaults, or ``fixed``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

from autokd.space.spec import (
    CONFIG_DIR,
    NUMBER_FIELDS,
    OP_FIELDS,
    DistillerSpec,
    OpChoice,
    SpecError,
    load_yaml,
)

LEVEL_FIELDS = OP_FIELDS + NUMBER_FIELDS


def _option_string(v: Any) -> str:
    if isinstance(v, bool):
        raise ValueError(f"expected an option name or number, got {v!r}")
    if isinstance(v, (int, float)):
        return format(float(v), "g")
    return str(v)


@dataclass
class Level:
    name: str
    options: List[str]
    requires: Dict[str, List[str]] = field(default_factory=dict)

    def active(self, design: Mapping[str, str]) -> bool:
        return all(design.get(k) in v for k, v in self.requires.items())


class SearchSpace:
    """Ordered levels of a distiller search tree; see the module docstring."""

    def __init__(
        self,
        levels: List[Level],
        name: str = "custom",
        fixed: Optional[Mapping[str, Any]] = None,
        description: str = "",
    ):
        self.name = name
        self.description = description
        self.fixed = dict(fixed or {})
        DistillerSpec.from_dict(self.fixed)  # fixed fields must be valid spec fields
        seen: Dict[str, Level] = {}
        for lv in levels:
            where = f"search space {name!r}, level {lv.name!r}"
            if lv.name not in LEVEL_FIELDS:
                raise ValueError(f"{where}: unknown level name; valid: {', '.join(LEVEL_FIELDS)}")
            if lv.name in seen:
                raise ValueError(f"{where}: duplicate level")
            if lv.name in self.fixed:
                raise ValueError(f"{where}: also given in 'fixed'")
            if not lv.options:
                raise ValueError(f"{where}: expected at least one option, got none")
            if len(set(lv.options)) != len(lv.options):
                dup = sorted({o for o in lv.options if lv.options.count(o) > 1})
                raise ValueError(f"{where}: duplicate options {dup}")
            for o in lv.options:
                try:
                    DistillerSpec.from_dict({lv.name: float(o) if lv.name in NUMBER_FIELDS else o})
                except (SpecError, ValueError) as e:
                    raise ValueError(f"{where}: invalid option {o!r} ({e})") from None
            for k, vals in lv.requires.items():
                if k not in seen:
                    raise ValueError(
                        f"{where}: requires {k!r}, which is not an earlier level; earlier: "
                        f"{', '.join(seen) or '(none)'}"
                    )
                bad = [v for v in vals if v not in seen[k].options]
                if bad or not vals:
                    raise ValueError(
                        f"{where}: requires {k!r} in {vals!r}, but {k!r} has options "
                        f"{seen[k].options}"
                    )
            seen[lv.name] = lv
        self.levels = list(levels)
        self._by_name = seen

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_name: str = "custom") -> "SearchSpace":
        valid = {"name", "description", "levels", "fixed"}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"search space: unknown key(s) {unknown}; valid: {', '.join(sorted(valid))}"
            )
        raw_levels = data.get("levels") or []
        if not isinstance(raw_levels, list):
            raise ValueError(
                f"search space: expected 'levels' to be a list of levels, got "
                f"{type(raw_levels).__name__} {raw_levels!r:.60}"
            )
        fixed = data.get("fixed")
        if fixed is not None and not isinstance(fixed, Mapping):
            raise ValueError(
                f"search space: expected 'fixed' to be a mapping of spec fields, got "
                f"{type(fixed).__name__} {fixed!r:.60}"
            )
        levels = []
        for i, raw in enumerate(raw_levels):
            if (
                not isinstance(raw, Mapping)
                or set(raw) - {"name", "options", "requires"}
                or "name" not in raw
            ):
                raise ValueError(
                    f"search space: level {i}: expected {{name, options, requires}}, got {raw!r}"
                )
            where = f"search space: level {i} ({raw['name']!r})"
            options = raw.get("options") or []
            if not isinstance(options, list):
                raise ValueError(
                    f"{where}: expected 'options' to be a list, got "
                    f"{type(options).__name__} {options!r:.60}"
                )
            req = raw.get("requires") or {}
            if not isinstance(req, Mapping):
                raise ValueError(
                    f"{where}: expected 'requires' to be a mapping of earlier level -> "
                    f"allowed options (e.g. {{logit_distance: [kl]}}), got "
                    f"{type(req).__name__} {req!r:.60}"
                )
            requires = {
                str(k): [_option_string(v) for v in (vs if isinstance(vs, list) else [vs])]
                for k, vs in req.items()
            }
            levels.append(Level(str(raw["name"]), [_option_string(o) for o in options], requires))
        if not levels:
            raise ValueError("search space: expected at least one level, got none")
        return cls(
            levels,
            name=data.get("name", default_name),
            fixed=data.get("fixed"),
            description=data.get("description", ""),
        )

    # -- the tree -------------------------------------------------------------------------

    def engine_levels(self) -> List[Dict[str, Any]]:
        """Levels as the MCTS engine takes them: [{"name", "options", "requires"}]."""
        return [
            {
                "name": lv.name,
                "options": list(lv.options),
                "requires": {k: list(v) for k, v in lv.requires.items()},
            }
            for lv in self.levels
        ]

    def designs(self) -> Iterator[Dict[str, str]]:
        """Every complete design, depth first in level order."""

        def walk(i, design):
            if i == len(self.levels):
                yield dict(design)
                return
            lv = self.levels[i]
            if not lv.active(design):
                yield from walk(i + 1, design)
                return
            for o in lv.options:
                design[lv.name] = o
                yield from walk(i + 1, design)
            del design[lv.name]

        yield from walk(0, {})

    def sample(self, rng) -> Dict[str, str]:
        """A uniform random rollout (each level's option uniformly), ``rng`` a random.Random."""
        design: Dict[str, str] = {}
        for lv in self.levels:
            if lv.active(design):
                design[lv.name] = rng.choice(lv.options)
        return design

    def check_design(self, design: Mapping[str, Any]) -> Dict[str, str]:
        """The design with its values as option strings; errors for missing, extra or bad values."""
        if not isinstance(design, Mapping):
            raise ValueError(
                f"design: expected a mapping of level -> option, got {type(design).__name__}"
            )
        out: Dict[str, str] = {}
        for lv in self.levels:
            if not lv.active(out):
                continue
            if lv.name not in design:
                raise ValueError(
                    f"design: missing level {lv.name!r}; options: {', '.join(lv.options)}"
                )
            v = _option_string(design[lv.name])
            if v not in lv.options:
                close = difflib.get_close_matches(v, lv.options, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"design: level {lv.name!r}: invalid option {v!r}{hint}; allowed: "
                    f"{', '.join(lv.options)}"
                )
            out[lv.name] = v
        extra = sorted(set(design) - set(out))
        if extra:
            raise ValueError(
                f"design: level(s) {extra} are not part of this design in space {self.name!r} "
                f"(unknown, or absent after the earlier choices)"
            )
        return out

    def spec_from_design(
        self, design: Mapping[str, Any], name: Optional[str] = None
    ) -> DistillerSpec:
        design = self.check_design(design)
        data: Dict[str, Any] = dict(self.fixed)
        for k, v in design.items():
            data[k] = float(v) if k in NUMBER_FIELDS else v
        if name is not None:
            data["name"] = name
        return DistillerSpec.from_dict(data)

    def design_from_spec(self, spec: Union[DistillerSpec, Mapping[str, Any]]) -> Dict[str, str]:
        """The design whose spec equals ``spec`` (its name and the fields of absent levels aside);
        ValueError naming the first field outside the space."""
        spec = DistillerSpec.coerce(spec)
        design: Dict[str, str] = {}
        for lv in self.levels:
            if not lv.active(design):
                continue
            value = getattr(spec, lv.name)
            match = None
            for o in lv.options:
                if lv.name in NUMBER_FIELDS:
                    if float(o) == value:
                        match = o
                elif isinstance(value, OpChoice) and value == OpChoice(o):
                    match = o
                if match is not None:
                    break
            if match is None:
                shown = value.to_plain() if isinstance(value, OpChoice) else value
                raise ValueError(
                    f"spec {spec.label()} is outside space {self.name!r}: field {lv.name!r} "
                    f"is {shown!r}; the space allows {', '.join(lv.options)}"
                )
            design[lv.name] = match
        canonical = self.spec_from_design(design)
        active = (
            set(design)
            | set(self.fixed)
            | {f for f in DistillerSpec.field_names() if f not in self._by_name}
        )
        for f in sorted(active - {"name"}):
            if getattr(canonical, f) != getattr(spec, f):
                raise ValueError(
                    f"spec {spec.label()} is outside space {self.name!r}: field {f!r} is "
                    f"{getattr(spec, f)!r}, the space fixes {getattr(canonical, f)!r}"
                )
        return design

    # The number of designs is the MCTS engine's count, the one count of the project (exact,
    # big-integer): autokd.search.mcts.MCTS(space.engine_levels()).num_designs().

    def __repr__(self):
        return f"SearchSpace({self.name!r}, levels={[lv.name for lv in self.levels]})"


def space_fingerprint(space: SearchSpace) -> str:
    """Identity of a space's content: SHA-256 over its levels in order (names, options,
    requires) and its fixed fields in canonical spec form. The name, the description and the
    file's layout (comments, order of keys, "1" vs 1.0) do not count; anything that changes
    the tree or the specs its designs make does. A search pins it in its journal so that a space
    file edited between two runs of one search is refused on resume, not silently mixed."""
    content = {
        "levels": [
            {
                "name": lv.name,
                "options": list(lv.options),
                "requires": {k: list(v) for k, v in sorted(lv.requires.items())},
            }
            for lv in space.levels
        ],
        "fixed": {
            k: v
            for k, v in DistillerSpec.from_dict(space.fixed).to_dict().items()
            if k in space.fixed
        },
    }
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def list_spaces():
    return sorted(p.stem for p in (CONFIG_DIR / "spaces").glob("*.yaml"))


def load_space(name_or_path: Union[str, pathlib.Path] = "autokd") -> SearchSpace:
    """A search space by name ("autokd": the paper's Table 1; "extended") or YAML path."""
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / "spaces" / f"{name_or_path}.yaml"
        if not path.is_file():
            known = list_spaces()
            raise KeyError(
                f"unknown search space {str(name_or_path)!r}: neither a file nor one of "
                f"{', '.join(known)}"
            )
    data = load_yaml(path.read_text(), f"search space {str(path)!r}")
    if data is None:
        raise ValueError(f"search space {str(path)!r}: empty, expected a mapping with 'levels'")
    if not isinstance(data, Mapping):
        raise ValueError(
            f"search space {str(path)!r}: expected a mapping, got {type(data).__name__}"
        )
    return SearchSpace.from_dict(data, default_name=path.stem)
