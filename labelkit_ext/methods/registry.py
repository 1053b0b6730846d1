"""The method registry behind ``labelkit run <method>``.

A method module calls ``register_method`` at import with its name, a function adding its
argparse arguments, and its run function; ``load_methods`` imports every module of this
package, so a new method needs no edit anywhere else.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Method", "register_method", "get_method", "available_methods", "load_methods"]

RunFn = Callable[[argparse.Namespace], dict]
AddArgumentsFn = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Method:
    """A runnable method: ``run(args)`` returns the results it wrote to results.json."""

    name: str
    run: RunFn
    add_arguments: AddArgumentsFn | None = None
    help: str = ""


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, run: RunFn, add_arguments: AddArgumentsFn | None = None, help: str = ""
) -> Method:
    """Register ``name`` (lower-case, dashes allowed) for ``labelkit run <name>``.

    ``add_arguments(parser)`` adds the method's own options; the data and run options
    (``add_data_arguments``, ``add_run_arguments``) are added for every method. Registering
    a name again from the same module (a reload) replaces it; from another module is an error.
    """
    if not name or name != name.lower() or not name.replace("-", "").isalnum():
        raise ValueError(f"method name must be lower-case letters, digits and dashes, got {name!r}")
    existing = _METHODS.get(name)
    if existing is not None and existing.run.__module__ != run.__module__:
        raise ValueError(f"method {name!r} is already registered by {existing.run.__module__}")
    method = Method(name, run, add_arguments, help)
    _METHODS[name] = method
    return method


def load_methods() -> dict[str, Method]:
    """Import every method module of ``labelkit_ext.methods`` (they register themselves)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    return dict(_METHODS)


def available_methods() -> list[str]:
    """Registered method names (after ``load_methods``)."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name``."""
    if name not in _METHODS:
        raise ValueError(f"method must be one of {available_methods()}, got {name!r}")
    return _METHODS[name]
