"""Methods run by ``labelkit run <method>``: each module registers itself with
``register_method``; ``load_methods()`` imports them all. ``supervised`` is the baseline."""

from labelkit_ext.methods.registry import (
    Method,
    available_methods,
    get_method,
    load_methods,
    register_method,
)

__all__ = ["Method", "available_methods", "get_method", "load_methods", "register_method"]
