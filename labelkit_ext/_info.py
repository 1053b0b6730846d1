"""``labelkit_ext.info()`` and ``python -m labelkit_ext info``: what this install can do."""

from __future__ import annotations

import platform

import torch

from labelkit_ext import _ext


def info(as_dict: bool = False) -> dict | str:
    """Report the extension state, kernels per device, GPU visibility and versions.

    Returns a human-readable multi-line string, or the underlying dict with ``as_dict=True``.
    """
    ops = sorted({op for op, _ in _ext.KERNELS})
    report = {
        "labelkit_ext": _version(),
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
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return report if as_dict else _format(report)


def _version() -> str:
    from labelkit_ext import __version__

    return __version__


def _format(r: dict) -> str:
    loaded = "yes" if r["extension_loaded"] else f"no ({r['extension_error']})"
    build = r["build"] or {}
    gpus = ", ".join(r["gpus"]) if r["gpus"] else "none visible"
    lines = [
        f"labelkit_ext {r['labelkit_ext']}",
        f"  extension _C     : {loaded}",
        *([f"  loaded instead   : {r['library']} (LABELKIT_EXT_LIBRARY)"] if r["library"] else []),
        f"  built against    : torch {build.get('torch', '-')}, CUDA {build.get('torch_cuda', '-')}, "
        f"archs {build.get('cuda_archs') or '-'}, with_cuda={build.get('with_cuda', '-')}",
        f"  CPU kernels      : {', '.join(r['cpu_kernels']) or 'none (pure-PyTorch reference)'}",
        f"  CUDA kernels     : {', '.join(r['cuda_kernels']) or 'none'}",
        f"  GPU              : {gpus}",
        f"  torch            : {r['torch']} (CUDA {r['torch_cuda']})",
        f"  python           : {r['python']} on {r['platform']}",
    ]
    return "\n".join(lines)
