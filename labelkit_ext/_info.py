"""``labelkit_ext.info()`` and ``labelkit info``: what this install can do.

Two depths: ``install_info()`` reads files and package metadata only (no ``import torch``, so
``labelkit info`` answers in well under a second); ``info()`` also loads torch and the extension
and reports whether it loaded, which kernels each device has, and the GPUs.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def install_info(as_dict: bool = False) -> dict | str:
    """What is installed, without importing torch: versions, the extension file and the torch
    it was built against. ``info()`` says whether it actually loads."""
    build_file = _HERE / "_build_info.json"
    try:
        build = json.loads(build_file.read_text()) if build_file.exists() else None
    except (OSError, ValueError):
        build = None
    extension = sorted(_HERE.glob("_C*.so")) + sorted(_HERE.glob("_C*.pyd"))
    report = {
        "labelkit_ext": _version(),
        "extension_file": str(extension[0]) if extension else None,
        "build": build,
        "torch": _installed("torch"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return report if as_dict else _format(report)


def info(as_dict: bool = False) -> dict | str:
    """Report the extension state, kernels per device, GPU visibility and versions.

    Returns a human-readable multi-line string, or the underlying dict with ``as_dict=True``.
    """
    import torch

    from labelkit_ext import _ext

    ops = sorted({op for op, _ in _ext.KERNELS})
    report = {
        **install_info(as_dict=True),
        "extension_loaded": _ext.HAS_OPS,
        "extension_error": _ext.LOAD_ERROR,
        "library": _ext.LIBRARY,
        "build": _ext.BUILD_INFO,
        "cpu_kernels": sorted(op for op in ops if _ext.has_kernel(op, "cpu")),
        "cuda_kernels": sorted(op for op in ops if _ext.has_kernel(op, "cuda")),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_cache": _cpu_cache(),
    }
    return report if as_dict else _format(report)


def _cpu_cache() -> dict | str:
    """The CPU output cache's stats, or why they are unavailable (a bad LABELKIT_CPU_CACHE_MB)."""
    from dataclasses import asdict

    from labelkit_ext.memory import cpu_cache_stats

    try:
        return asdict(cpu_cache_stats())
    except RuntimeError as exc:
        return str(exc).splitlines()[0]


def _version() -> str:
    from labelkit_ext import __version__

    return __version__


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _format(r: dict) -> str:
    loaded = "extension_loaded" in r  # info() rather than install_info()
    lines = [
        f"labelkit_ext {r['labelkit_ext']}",
        *(_loaded_lines(r) if loaded else _install_lines(r)),
        f"  python           : {r['python']} on {r['platform']}",
    ]
    if not loaded:
        lines.append(
            "  (`labelkit info --load` loads torch and the extension: kernels per device, GPUs)"
        )
    return "\n".join(lines)


def _build_line(r: dict) -> str:
    build = r["build"] or {}
    return (
        f"  built against    : torch {build.get('torch', '-')}, CUDA {build.get('torch_cuda', '-')}, "
        f"archs {build.get('cuda_archs') or '-'}, with_cuda={build.get('with_cuda', '-')}"
    )


def _install_lines(r: dict) -> list[str]:
    return [
        f"  extension _C     : {r['extension_file'] or 'not built (the pure-PyTorch references run)'}",
        _build_line(r),
        f"  torch            : {r['torch'] or 'not installed'}",
    ]


def _cache_line(cache: dict | str, loaded: bool) -> str:
    if not loaded:
        return "not used (no compiled kernels)"
    if isinstance(cache, str):
        return cache
    mib = 2**20
    return (
        f"{cache['cached_bytes'] // mib} MiB cached of a {cache['limit_bytes'] // mib} MiB limit "
        "(LABELKIT_CPU_CACHE_MB)"
    )


def _loaded_lines(r: dict) -> list[str]:
    loaded = "yes" if r["extension_loaded"] else f"no ({r['extension_error']})"
    gpus = ", ".join(r["gpus"]) if r["gpus"] else "none visible"
    return [
        f"  extension _C     : {loaded}",
        *([f"  loaded instead   : {r['library']} (LABELKIT_EXT_LIBRARY)"] if r["library"] else []),
        _build_line(r),
        f"  CPU kernels      : {', '.join(r['cpu_kernels']) or 'none (pure-PyTorch reference)'}",
        f"  CUDA kernels     : {', '.join(r['cuda_kernels']) or 'none'}",
        f"  GPU              : {gpus}",
        f"  CPU output cache : {_cache_line(r['cpu_cache'], r['extension_loaded'])}",
        f"  torch            : {r['torch']} (CUDA {r['torch_cuda']})",
    ]
