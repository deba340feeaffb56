"""Argument checks shared by the core and the callbacks: finite numbers, real integers, no booleans."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any, Literal, overload

__all__ = ["check_bool", "check_callable", "check_choice", "check_int", "check_names", "check_number"]


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number within the bounds; else a ValueError naming it.

    Booleans are refused (``True`` is not a ratio), and so are NaN and infinity.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        raise ValueError(f"`{name}` must be in {span}, got {value!r}.")
    return value


@overload
def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: Literal[False] = False) -> int: ...
@overload
def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool) -> int | None: ...
def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer (not a bool) at least ``minimum``; else a ValueError naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        none = "None or " if allow_none else ""
        raise ValueError(f"`{name}` must be {none}an integer{bound}, got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; else a ValueError naming it."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_callable(name: str, value: Any, signature: str, *, allow_none: bool = True) -> Any:
    """``value`` if it is callable (or ``None`` when allowed); else a ValueError naming it and its signature."""
    if (value is None and allow_none) or callable(value):
        return value
    none = "None or " if allow_none else ""
    raise ValueError(f"`{name}` must be {none}a callable `{signature}`, got {value!r}.")


def check_names(name: str, value: Any, *, count: tuple[int, ...] | None = None) -> list[str] | None:
    """``value`` as a list of strings (``None`` stays ``None``); else a ValueError naming it.

    ``count``: the numbers of names allowed.
    """
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{name}` must be None or a list of names (strings), got {value!r}.")
    if count is not None and len(value) not in count:
        raise ValueError(f"`{name}` must hold {' or '.join(map(str, count))} names, got {list(value)!r}.")
    return list(value)
