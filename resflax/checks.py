"""Validation at the boundary: one error convention for every user-facing value.

Every check raises `ValueError` whose message starts with `<name>=<value!r>` and says what is
allowed, so a caller that prefixes the section (`config.model.`) gives the user one line naming
the field. Internal functions trust their callers; only configuration objects and app entry
points call these.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping


def choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """`value` if it is one of `allowed`, else ValueError listing them."""
    allowed = list(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}")
    return value


def registered(name: str, value: Any, registry: Mapping[str, Any]) -> Any:
    """`registry[value]`, or ValueError naming `name` and the registered (sorted) names."""
    if not isinstance(value, str) or value not in registry:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {sorted(registry)}")
    return registry[value]


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """`value` if it is an int (not a bool) `>= minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or (
        minimum is not None and value < minimum
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name}={value!r} must be an integer{bound}")
    return value


def number(name: str, value: Any, minimum: float = -math.inf, *, finite: bool = False) -> float:
    """`float(value)` if it is a real number (not a bool) `>= minimum` (and finite)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and value >= minimum and (not finite or math.isfinite(value))
    if not ok:
        bound = "" if minimum == -math.inf else f" >= {minimum}"
        raise ValueError(f"{name}={value!r} must be a {'finite ' if finite else ''}number{bound}")
    return float(value)


def positive(name: str, value: Any) -> float:
    """`float(value)` if it is a finite real number (not a bool) `> 0`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value < math.inf
    ):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def known_fields(section: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """ValueError naming the unknown keys of `section` and the allowed ones."""
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{section}: unknown field(s) {unknown}; allowed fields: {sorted(allowed)}")
