"""Shared test helpers: devices, per-dtype tolerances (written once, never widened to get
green), and the switch that proves the compiled extension is really in use."""

from __future__ import annotations

import os

import pytest
import torch

import labelkit_ext
from labelkit_ext import _ext

# Tolerances by the dtype a result is computed/stored in. Kernel and reference both compute
# float16/bfloat16 inputs in float32, so entropies compare at float32 tolerance; gradients are
# returned in the input dtype and compare at that dtype's tolerance.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

requires_ops = pytest.mark.skipif(
    not _ext.HAS_OPS, reason=f"compiled extension not loaded ({_ext.LOAD_ERROR})"
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw):
    """torch.testing.assert_close at the tolerance of ``dtype`` (default: actual's dtype)."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tol)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_report_header(config):
    return [labelkit_ext.info()]


def pytest_sessionstart(session):
    # CI sets LABELKIT_EXT_REQUIRE_EXT=1 for the main pass, so a build that silently fell back to
    # the references cannot pass as a kernel test run.
    if os.environ.get("LABELKIT_EXT_REQUIRE_EXT") == "1" and not _ext.HAS_OPS:
        raise pytest.UsageError(
            f"LABELKIT_EXT_REQUIRE_EXT=1 but the extension did not load: {_ext.LOAD_ERROR}"
        )
    # CI also sets LABELKIT_EXT_REQUIRE_CUDA_BUILD=1: the CUDA kernels must have been compiled
    # (they cannot run there, but they must never rot).
    if (
        os.environ.get("LABELKIT_EXT_REQUIRE_CUDA_BUILD") == "1"
        and _ext.HAS_OPS
        and not any(dev == "cuda" for _, dev in _ext.KERNELS)
    ):
        raise pytest.UsageError("LABELKIT_EXT_REQUIRE_CUDA_BUILD=1 but no CUDA kernel was compiled")
