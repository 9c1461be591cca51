"""Argument checks of the Python API's entry points.

A wrong type is a ``TypeError`` (a wrong value a ``ValueError``) that says what to pass, raised where
the argument enters, not an ``AttributeError`` deep inside; and one string is never taken as a list
of texts or paths (Python would iterate it character by character).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path


def texts(value: object, name: str = "texts") -> list[str]:
    """``value`` (an iterable of strings) as a list; one bare string is refused."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of strings, got one str (wrap it in a list: [text])")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__}")
    return items


def sources(value: object, name: str = "sources") -> list:
    """``value`` (an iterable of paths or model objects) as a list; one bare path is refused."""
    if isinstance(value, (str, Path)):
        raise TypeError(f"{name} must be a list of paths, got one {type(value).__name__} (wrap it: [path])")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of paths, got {type(value).__name__}")
    return list(value)


def count(value: object, name: str, low: int = 1) -> int:
    """An int ``>= low`` (not a bool, not a numeric string)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def string_map(value: object, name: str = "tags") -> dict[str, str]:
    """A mapping of strings to strings (tags, ``where`` filters), as a dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of str to str, got {type(value).__name__} {value!r}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"{name} must map str to str, got {key!r}: {item!r}")
    return dict(value)
