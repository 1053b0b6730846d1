"""Loads the compiled extension ``labelkit_ext._C`` and says what it provides.

Every other module can ask ``HAS_OPS`` / ``has_kernel`` without import cycles: this module
imports only torch and the standard library until its last lines, which, once ``_C`` has loaded,
import the op families (``register_ops``) so that every op's autograd formula and fake kernel is
registered with it. Importing ``_C`` runs its static ``TORCH_LIBRARY`` registrations, which
define every ``torch.ops.labelkit.*`` op.

``LABELKIT_EXT_LIBRARY=/path/to/liblabelkit_ops.so`` loads that libtorch-only build of csrc/
(CMakeLists.txt) with ``torch.ops.load_library`` instead of ``_C``: `make sanitize` runs the
Python tests this way against the AddressSanitizer/UBSan build (docs/testing.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

__all__ = [
    "HAS_OPS",
    "LOAD_ERROR",
    "BUILD_INFO",
    "LIBRARY",
    "KERNELS",
    "has_kernel",
    "BuildMismatchWarning",
]

_HERE = Path(__file__).resolve().parent


class BuildMismatchWarning(UserWarning):
    """The extension was built against another torch than the one installed."""


def _env_disabled() -> bool:
    return os.environ.get("LABELKIT_EXT_NO_EXT", "0").strip().lower() in ("1", "true", "yes", "on")


def _read_build_info() -> dict | None:
    path = _HERE / "_build_info.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the local tag does not change the ABI we link against."""
    return version.split("+")[0]


def _check_build(info: dict | None) -> None:
    if info is None:
        return
    built = info.get("torch", "?")
    if (
        _release(built) != _release(torch.__version__)
        or info.get("torch_cuda") != torch.version.cuda
    ):
        warnings.warn(
            f"labelkit_ext._C was built against torch {built} (CUDA {info.get('torch_cuda')}) but "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) is installed. Rebuild it: "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` in the labelkit_ext "
            "source tree, or reinstall the matching torch.",
            BuildMismatchWarning,
            stacklevel=3,
        )


def _library_override() -> str | None:
    return os.environ.get("LABELKIT_EXT_LIBRARY") or None


def _load() -> tuple[bool, str | None]:
    if _env_disabled():
        return False, "disabled by LABELKIT_EXT_NO_EXT=1"
    if LIBRARY is not None:
        try:
            torch.ops.load_library(LIBRARY)
        except OSError as exc:
            return False, f"LABELKIT_EXT_LIBRARY={LIBRARY} failed to load: {exc}"
        return True, None
    try:
        from labelkit_ext import _C  # noqa: F401  (registers torch.ops.labelkit)
    except ImportError as exc:
        return False, f"labelkit_ext._C could not be imported: {exc}"
    except OSError as exc:  # a shared-library loading failure (e.g. undefined symbol)
        return False, f"labelkit_ext._C failed to load: {exc}"
    return True, None


#: The library loaded instead of ``_C`` (LABELKIT_EXT_LIBRARY), else None.
LIBRARY: str | None = _library_override()
# _build_info.json describes _C, so it means nothing when another library is loaded.
BUILD_INFO: dict | None = None if LIBRARY else _read_build_info()
if not _env_disabled():
    _check_build(BUILD_INFO)
HAS_OPS, LOAD_ERROR = _load()


def _library_ops() -> tuple[str, ...]:
    """The ``labelkit::`` ops the compiled library defines, read once at load (the Python
    wrappers add small ops of their own later, e.g. ``_badge_uniforms``; their code is in the
    ``ops/*.py`` files the compile-cache fingerprint hashes)."""
    if not HAS_OPS:
        return ()
    return tuple(
        sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("labelkit::"))
    )


LIBRARY_OPS: tuple[str, ...] = _library_ops()


def _compiled_kernels() -> frozenset[tuple[str, str]]:
    """(op, device_type) pairs with a compiled kernel, read once from the dispatcher."""
    names = [n.split("::", 1)[1] for n in LIBRARY_OPS]
    return frozenset(
        (name, dev)
        for name in names
        for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"labelkit::{name}", key)
    )


KERNELS: frozenset[tuple[str, str]] = _compiled_kernels()


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.labelkit.<op>`` has a compiled kernel for ``device_type``.

    A static fact of the build (a frozen set read at import), so wrappers may branch on it
    under ``torch.compile``. On the meta device every compiled op has one: its fake kernel
    (shapes without data, registered with the op), where the reference would need values.
    """
    if device_type == "meta":
        return (op, "cpu") in KERNELS or (op, "cuda") in KERNELS
    return (op, device_type) in KERNELS


def _ops_fingerprint() -> str:
    """A hash of what torch.compile learns about our ops: their schemas and the Python files
    holding their fake kernels and autograd formulas."""
    digest = hashlib.sha256()
    for name in LIBRARY_OPS:
        base, _, overload = name.partition(".")
        digest.update(str(torch._C._get_schema(base, overload)).encode())
    for source in sorted((_HERE / "ops").glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _tag_compile_caches() -> None:
    """Add our ops' fingerprint to ``torch.compiler.config.cache_key_tag``.

    torch.compile's on-disk caches (FX graph, AOTAutograd) key a graph by its code and inputs,
    not by the schemas or fake kernels of the custom ops it calls. After an upgrade that changes
    an op's outputs, a cached graph would replay the old output shapes ("mismatch in length of
    strides and shape", or worse). The tag makes such entries miss; graphs without our ops
    only miss once per labelkit_ext version.
    """
    mark = f"labelkit_ext:{_ops_fingerprint()}"
    tag = torch.compiler.config.cache_key_tag
    if mark not in tag:
        torch.compiler.config.cache_key_tag = f"{tag}|{mark}" if tag else mark


if HAS_OPS:
    _tag_compile_caches()
    # The ops are live from here on, so their autograd formulas and fake kernels must be too: a
    # torch.ops.labelkit call made before its family's Python module was imported (a loaded
    # torch.export program) would otherwise run without a gradient, silently. The families
    # import this module's names, all defined above.
    from labelkit_ext.ops import register_ops

    register_ops()
