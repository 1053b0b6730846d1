"""Checks every config dataclass shares: field types, finite floats, seed ranges.

``check_fields(config)`` is the first line of a config's ``__post_init__``: it catches what the
per-field range checks cannot (``'5' < 1`` is a TypeError of its own, and every comparison with
NaN is False, so ``lr=nan`` would pass ``lr <= 0``). Messages name the field, which is also the
``labelkit`` option (``--`` + the name with dashes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from labelkit_ext.errors import UsageError

__all__ = [
    "SEED_LIMIT",
    "check_fields",
    "check_int",
    "check_seed",
    "check_seeds",
    "is_seed_field",
]

#: Seeds go to numpy's generators, which take [0, 2**32).
SEED_LIMIT = 2**32


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(kind: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None is allowed)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_seed_field(name: str) -> bool:
    """``seed``, ``*_seed``, and ``seeds`` (a sequence of them)."""
    return name in ("seed", "seeds") or name.endswith("_seed")


def check_seed(name: str, value: Any) -> int:
    """``value`` is an int in numpy's seed range [0, 2**32); returned as a Python int."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not 0 <= value < SEED_LIMIT:
        raise UsageError(f"{name} must be in [0, 2**32), got {value}")
    return int(value)


def check_seeds(seeds: Any, name: str = "seeds") -> list[int]:
    """``seeds`` (any iterable of integers: a list, a range, a generator, a 1-D NumPy array or
    tensor) as a list of distinct Python ints in [0, 2**32), at least one."""
    if hasattr(seeds, "ndim") and hasattr(seeds, "tolist"):  # NumPy array, tensor
        seeds = seeds.tolist() if seeds.ndim == 1 else seeds
    if isinstance(seeds, (str, bytes, Mapping)) or not isinstance(seeds, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {seeds!r}")
    values = [check_seed(name, seed) for seed in seeds]
    if not values:
        raise UsageError(f"{name} must hold at least one seed")
    if len(set(values)) != len(values):
        raise UsageError(f"{name} must be distinct, got {values}")
    return values


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` is an int (not a bool, not a str), ``>= minimum`` when given; returned as a
    Python int (a NumPy one converted)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_value(name: str, kind: Any, value: Any) -> None:
    if kind is int:
        check_int(name, value)
    elif kind is float:
        if not _is_real(value):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value}")


def _plain(kind: Any, value: Any) -> Any:
    """A checked number as the Python type: ``np.int64(3)`` -> 3, ``np.float32(0.5)`` -> 0.5, so
    that configs pickle into checkpoints that ``torch.load(weights_only=True)`` reads back, and
    JSON, ``random.seed`` and DataLoader take them."""
    if kind is int and type(value) is not int:
        return int(value)
    if kind is float and type(value) not in (int, float):
        return float(value)
    return value


def check_fields(config: Any) -> None:
    """Type-check the int / float / (tuple or list of those) fields of the dataclass ``config``,
    refuse NaN and infinities, and keep ``seed`` / ``*_seed`` fields in [0, 2**32). NumPy numbers
    (and a 1-D array for a sequence field) pass and are stored as Python ones (``_plain``)."""
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kind, optional = _base(hints[field.name])
        if value is None and optional:
            continue
        if typing.get_origin(kind) in (tuple, list):
            item = typing.get_args(kind)[0]
            if isinstance(value, np.ndarray) and value.ndim == 1:
                value = typing.get_origin(kind)(value.tolist())
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"{field.name} must be a sequence, got {value!r}")
            for element in value:
                _check_value(field.name, item, element)
                if item is int and is_seed_field(field.name):
                    check_seed(field.name, element)
            value = type(value)(_plain(item, element) for element in value)
        else:
            _check_value(field.name, kind, value)
            if kind is int and is_seed_field(field.name):
                check_seed(field.name, value)
            value = _plain(kind, value)
        object.__setattr__(config, field.name, value)  # frozen configs too
