"""The method registry behind ``labelkit run <method>``.

A method module calls ``register_method`` at import with its name, its config dataclass (whose
fields, made with ``engine.option``, are the method's command-line options) and its run
function ``run(config, out_dir, *, resume=False) -> results``; ``load_methods`` imports every
module of this package, so a new method needs no edit anywhere else. The CLI imports methods
only for ``labelkit run``, so ``labelkit --help`` and ``labelkit info`` stay light.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from labelkit_ext.engine.options import option_names
from labelkit_ext.errors import UsageError

__all__ = ["Method", "register_method", "get_method", "available_methods", "load_methods"]

RunFn = Callable[..., dict]
#: Options the CLI adds for every method; a config field may not take these names.
RESERVED_OPTIONS = ("out", "resume")


@dataclass(frozen=True)
class Method:
    """A runnable method: ``run(config(...), out_dir, resume=...)`` returns the results it
    wrote to ``out_dir/results.json``."""

    name: str
    config: type
    run: RunFn
    help: str = ""


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, config: type, run: RunFn, help: str = "") -> Method:
    """Register ``name`` (lower-case, dashes allowed) for ``labelkit run <name>``.

    ``config`` is a dataclass whose fields are the method's options (nested configs such as
    ``TrainConfig`` and ``DataConfig`` become option groups; a ``train: TrainConfig`` field is
    required); ``run(config, out_dir, *,
    resume=False)`` runs it. Registering a name again from the same module (a reload) replaces
    it; from another module is an error.
    """
    if not name or name != name.lower() or not name.replace("-", "").isalnum():
        raise ValueError(f"method name must be lower-case letters, digits and dashes, got {name!r}")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"method {name!r}: config must be a dataclass, got {config!r}")
    if not any(f.name == "train" for f in dataclasses.fields(config)):
        # The CLI reads train.device to set up torchrun's process group before the run.
        raise TypeError(f"method {name!r}: config needs a `train: TrainConfig` field")
    clash = sorted(set(option_names(config)) & set(RESERVED_OPTIONS))
    if clash:
        raise TypeError(f"method {name!r}: config fields {clash} clash with the CLI's own options")
    existing = _METHODS.get(name)
    if existing is not None and existing.run.__module__ != run.__module__:
        raise ValueError(f"method {name!r} is already registered by {existing.run.__module__}")
    method = Method(name, config, run, help)
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
        raise UsageError(f"method must be one of {available_methods()}, got {name!r}")
    return _METHODS[name]
