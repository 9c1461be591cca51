"""One serializer for the project's dataclasses: ``to_json(obj)`` and ``from_json(cls, data)``.

``to_json`` gives what ``json.dumps`` writes: a dataclass becomes a dict of its fields in declaration
order (recursively), tuples become lists, paths strings, numpy arrays lists. ``from_json`` is its
inverse: it rebuilds ``cls`` and the dataclasses nested in it from the fields' type hints and checks
every value's type on the way, so a corrupt or hand-edited file is an error naming the field
(``TrainingRun.config.rank: expected int, got '8'``), not a crash later.

The persisted dataclasses (``BaseFingerprint``, ``EmbeddingSpace``, ``Embedding``, ``TrainConfig``,
``TrainingRun``, ``Score``) go through these two functions; their ``to_dict``/``from_dict`` methods
are one-line wrappers kept for their callers. Numpy array fields are float32 vectors.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from pathlib import Path
from reprlib import repr as short  # messages stay one short line whatever the file holds

import numpy as np

from delta_router.errors import DeltaRouterError, StoredFieldError

T = typing.TypeVar("T")


def to_json(obj: object) -> object:
    """``obj`` as JSON-ready values: dataclasses as dicts (field order), tuples as lists, paths as str.

    The one writer of the project's dataclasses (see the module docstring): a field added to a
    dataclass is written without touching a hand-kept list of keys.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {key: to_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(item) for item in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    return obj


def from_json(
    cls: type[T], data: object, error: type[DeltaRouterError] = StoredFieldError, known: dict | None = None
) -> T:
    """``cls`` rebuilt from ``to_json``'s output, every value checked against its field's type hint.

    The one reader of the project's dataclasses (see the module docstring), so every file is
    validated by the same rules. Missing fields take their defaults; unknown fields are refused;
    ``known`` gives fields as Python values, taken as they are. Bad input raises ``error`` naming
    the field: the caller's ``DeltaRouterError`` subclass, or ``StoredFieldError`` (a ValueError, so
    readers that wrap parse errors with their file's name, like the index, do so).
    """
    return _dataclass(cls, data, cls.__name__, error, known or {})


@cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _dataclass(cls: type[T], data: object, where: str, error: type[DeltaRouterError], known: dict) -> T:
    if not isinstance(data, dict):
        raise error(f"{where}: expected an object, got {short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise error(f"{where}: unknown field(s) {short(unknown)}")
    values = dict(known)
    for name, item in fields.items():
        if name in values:
            continue
        if name in data:
            values[name] = _value(_hints(cls)[name], data[name], f"{where}.{name}", error)
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise error(f"{where}: missing field {name!r}")
    return cls(**values)


def _value(hint: object, value: object, where: str, error: type[DeltaRouterError]) -> object:
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # our unions are "X | None"
        return _value(hint, value, where, error)
    if hint is typing.Any or (origin is typing.Literal and value in args):
        return value
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, where, error, {})
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        item = args[0] if args else typing.Any  # tuple[str, ...] -> str
        items = [_value(item, v, f"{where}[{i}]", error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        if not args:
            return value
        return {_value(args[0], k, where, error): _value(args[1], v, f"{where}[{k!r}]", error)
                for k, v in value.items()}  # fmt: skip
    if hint is np.ndarray and isinstance(value, (list, np.ndarray)):
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, (str, Path)):
        return Path(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (isinstance(value, bool) and hint is int):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise error(f"{where}: expected {name}, got {short(value)}")
