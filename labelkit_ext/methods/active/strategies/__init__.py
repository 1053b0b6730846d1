"""Query strategies, one module each; importing this package registers them all.

``build_strategy(name, **params)`` makes one; ``available_strategies()`` lists the names.
A new strategy is one new module here (see ``base.py``).
"""

from __future__ import annotations

import importlib
import pkgutil

from labelkit_ext.methods.active.strategies.base import (
    NEEDS,
    PoolScores,
    SelectionContext,
    Strategy,
    available_strategies,
    build_strategy,
    check_selection,
    register_strategy,
    select,
    top_unlabeled,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "NEEDS",
    "PoolScores",
    "SelectionContext",
    "Strategy",
    "available_strategies",
    "build_strategy",
    "check_selection",
    "register_strategy",
    "select",
    "top_unlabeled",
]
