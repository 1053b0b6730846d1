"""``labelkit run <method>`` options generated from a method's config dataclass.

Every option is a dataclass field made with ``engine.option(default, help, ...)``; its default
is the default of the Python API, so ``labelkit run m`` with no options and
``run_m(MConfig())`` are the same run. Nested config dataclasses (``TrainConfig``,
``DataConfig``) become argument groups with flat option names (``--epochs``, ``--dataset``).

Field metadata: ``help``; ``choices`` (a sequence, or a callable returning one, called when the
parser is built); ``metavar``; ``cli=False`` keeps a field out of the command line; on a nested
config field, ``helps`` ({sub-field: help}) replaces the help of some of its options; on a ``str``
field, ``join=","`` takes one or more values joined into it (``--strategies a b`` is
``--strategies a,b``, as the list options take space-separated values).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["add_config_arguments", "config_from_args", "option_names"]

C = TypeVar("C")


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_config(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _strip_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown_default(default: Any) -> str:
    """`` (default: ...)`` for the help; a sequence as the values one would type."""
    if default is None:
        return ""
    if isinstance(default, (list, tuple)):
        default = " ".join(map(str, default))
    return f" (default: {str(default).replace('%', '%%')})"


def _add_field(
    group: Any, field: dataclasses.Field, kind: Any, default: Any, help_text: str | None = None
) -> None:
    meta = field.metadata
    help_text = meta.get("help", "") if help_text is None else help_text
    base = _strip_optional(kind)
    if base is bool:
        if default:
            group.add_argument(
                "--no-" + field.name.replace("_", "-"),
                dest=field.name,
                action="store_false",
                help=f"turn off: {help_text}",
            )
        else:
            group.add_argument(_flag(field.name), action="store_true", help=help_text)
        return
    kwargs: dict[str, Any] = {"dest": field.name, "default": default}
    if typing.get_origin(base) in (list, tuple):
        kwargs["nargs"] = "+"
        base = typing.get_args(base)[0]
    elif "join" in meta:
        kwargs["nargs"] = "+"
    if base not in (int, float, str):
        raise TypeError(f"option {field.name}: unsupported type {kind!r}")
    kwargs["type"] = base
    choices = meta.get("choices")
    if choices is not None:
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    group.add_argument(_flag(field.name), help=help_text + _shown_default(default), **kwargs)


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str | None = None
) -> None:
    """Add an option per field of the dataclass ``cls`` (defaults from ``cls()``)."""
    defaults = cls()
    group = parser.add_argument_group(title) if title else parser
    for field, kind in _fields(cls):
        if not field.metadata.get("cli", True):
            continue
        value = getattr(defaults, field.name)
        if _is_config(kind):
            _add_nested(parser, field, kind, value)
        else:
            _add_field(group, field, kind, value)


def _add_nested(
    parser: argparse.ArgumentParser, field: dataclasses.Field, kind: type, value: Any
) -> None:
    # The nested defaults are the parent's (e.g. a method's TrainConfig(epochs=20)), and so
    # may be help texts: option(factory=..., helps={"image_size": "..."}) on the parent field.
    group = parser.add_argument_group(field.metadata.get("help") or field.name)
    helps = field.metadata.get("helps", {})
    for sub, sub_kind in _fields(kind):
        if not sub.metadata.get("cli", True):
            continue
        if _is_config(sub_kind):
            raise TypeError(f"{kind.__name__}.{sub.name}: configs nest one level deep")
        _add_field(group, sub, sub_kind, getattr(value, sub.name), helps.get(sub.name))


def option_names(cls: type) -> list[str]:
    """The flat option names (field names) of ``cls``, nested configs expanded; a name used
    twice is a programming error."""
    names: list[str] = []
    for field, kind in _fields(cls):
        if _is_config(kind):
            names += [f.name for f, _ in _fields(kind)]
        else:
            names.append(field.name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{cls.__name__}: option name(s) {repeated} appear twice")
    return names


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """``cls`` built from parsed options; fields without an option keep their defaults."""
    defaults = cls()
    values: dict[str, Any] = {}
    for field, kind in _fields(cls):
        if not field.init:
            continue
        current = getattr(defaults, field.name)
        if _is_config(kind):
            values[field.name] = dataclasses.replace(
                current,
                **{
                    f.name: _value(args, f, getattr(current, f.name))
                    for f, _ in _fields(kind)
                    if f.init
                },
            )
        else:
            values[field.name] = _value(args, field, current)
    return cls(**values)


def _value(args: argparse.Namespace, field: dataclasses.Field, default: Any) -> Any:
    value = getattr(args, field.name, default)
    if "join" in field.metadata and isinstance(value, list):
        return field.metadata["join"].join(value)
    # nargs="+" gives lists; a tuple-typed default stays a tuple so configs compare equal.
    return type(default)(value) if isinstance(default, tuple) and value is not None else value
