"""Public op wrappers (``labelkit_ext.ops.<op>``): argument checks, routing to the compiled kernel
or the reference, fake kernels and autograd. Submodules are imported by ``labelkit_ext``."""

from __future__ import annotations

import importlib
import pkgutil


def register_ops() -> None:
    """Register every op under ``torch.ops.labelkit`` with its fake kernel and autograd.

    Needed only by code that calls ``torch.ops.labelkit.*`` directly, or loads a program that does
    (``torch.export``), before using any public function: ``import labelkit_ext`` imports torch
    and the ops lazily, on first use of a public name. Imports every op family module here.
    """
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "types":
            importlib.import_module(f"{__name__}.{module.name}")
