"""Shared test helpers: devices, per-dtype tolerances (written once, never widened to get
green), and the switch that proves the compiled extension is really in use."""

from __future__ import annotations

import os
import re
from pathlib import Path

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


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw
):
    """torch.testing.assert_close at the tolerance of ``dtype`` (default: actual's dtype)."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(kw)
    expected = expected.to(device=actual.device, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def forced_loss_scaling(monkeypatch):
    """``patch(*modules)`` makes their ``grad_scaler`` hand out enabled CPU scalers, as float16
    GPUs get (scale 2**8, doubled after every step); returns the list of scalers handed out.
    Power-of-two scaling is exact, so a loop that scales, unscales and steps correctly trains
    the float32 run's weights bit for bit, and its scale grows."""
    made: list[torch.amp.GradScaler] = []

    def scaler(device, amp):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1))
        return made[-1]

    def patch(*modules):
        for module in modules:
            monkeypatch.setattr(module, "grad_scaler", scaler)
        return made

    return patch


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


# ---- the `ops` marker and the fuzz budget ---------------------------------------------------------

#: Op families: one module per family in labelkit_ext/ops/ (types.py holds shared result types).
OP_FAMILIES = frozenset(
    p.stem
    for p in (Path(labelkit_ext.__file__).parent / "ops").glob("*.py")
    if not p.stem.startswith("_") and p.stem != "types"
)


def op_family_of(test_file: str) -> str | None:
    """'test_entropy.py' / 'test_entropy_fuzz.py' -> 'entropy' when labelkit_ext/ops/entropy.py
    exists; None for every other file."""
    m = re.fullmatch(r"test_(.+)\.py", test_file)
    if not m:
        return None
    return next((f for f in OP_FAMILIES if m[1] == f or m[1].startswith(f + "_")), None)


def pytest_configure(config):
    import fuzzing

    fuzzing.register_profiles()
    from hypothesis import settings

    settings.load_profile(fuzzing.profile_for(config.getoption("markexpr")))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    # `make sanitize` runs `-m ops`: every test file of an op family, found by its name, so a new
    # op joins by naming its tests test_<family>.py / test_<family>_<anything>.py. Other files
    # opt in with `pytestmark = pytest.mark.ops`.
    for item in items:
        if op_family_of(item.path.name):
            item.add_marker(pytest.mark.ops)
