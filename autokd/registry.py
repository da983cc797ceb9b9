"""One generic registry for everything a configuration picks by name.

Search-space operations (transforms, distances, schedules), models and data sets are all
registered in a ``Registry`` and picked from configs as ``{key: ..., kwargs: {...}}``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Generic, Iterator, Mapping, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of objects (usually classes or factories).

    Duplicate keys raise at registration; unknown keys raise with close matches and the whole
    list of known keys, so a typo in a config is a one-line fix.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, key: str, obj: Optional[T] = None):
        """Register ``obj`` under ``key``; without ``obj``, works as a decorator."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.kind} registry: expected a non-empty string key, got {key!r}")

        def add(o: T) -> T:
            if key in self._items:
                raise KeyError(f"{self.kind} registry: {key!r} is already registered")
            self._items[key] = o
            return o

        return add if obj is None else add(obj)

    def get(self, key: str) -> T:
        try:
            return self._items[key]
        except (KeyError, TypeError):
            raise KeyError(self._unknown_message(key)) from None

    def _unknown_message(self, key: Any) -> str:
        known = sorted(self._items)
        close = difflib.get_close_matches(str(key), known, n=3) if isinstance(key, str) else []
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {key!r}{hint} Known: {', '.join(known) or '(none)'}"

    def build(self, config: Any, **extra: Any) -> Any:
        """Instantiate from ``"key"`` or ``{key: ..., kwargs: {...}}``."""
        if isinstance(config, str):
            key, kwargs = config, {}
        elif isinstance(config, Mapping):
            unknown = set(config) - {"key", "kwargs"}
            if unknown or "key" not in config:
                raise ValueError(
                    f"{self.kind} config: expected {{key: ..., kwargs: {{...}}}}, got keys "
                    f"{sorted(map(str, config))}"
                )
            key, kwargs = config["key"], dict(config.get("kwargs") or {})
        else:
            raise TypeError(
                f"{self.kind} config: expected a name or {{key:, kwargs:}}, "
                f"got {type(config).__name__}"
            )
        factory: Callable[..., Any] = self.get(key)  # type: ignore[assignment]
        return factory(**kwargs, **extra)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def keys(self):
        return sorted(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.keys()})"
