"""Shared Hypothesis strategies and the outcome check for every op's fuzz tests.

A fuzz test (``python_tests/test_<op>_fuzz.py``, marked ``@pytest.mark.fuzz``) draws an input
with the strategies below, works out which documented errors the input violates (``Raises``),
and hands both to :func:`check_op`: with no violation the op must match its reference at the
shared per-dtype tolerance; with violations it must raise one of those documented errors. Any
other outcome fails: an undocumented exception, a silent answer to bad input, a wrong answer.
A crash kills the run (under ``make sanitize`` so does any out-of-bounds access or undefined
behaviour), and pytest-timeout turns a hang into a failure.

Budgets: the ``ci`` profile (default; fixed, derandomised examples) and the ``fuzz`` profile
(``pytest -m fuzz``, random, many more examples); ``LABELKIT_FUZZ_EXAMPLES=N`` overrides either.
conftest.py picks the profile. Tests must not pass ``max_examples`` themselves.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from conftest import DEVICES, TOLERANCES
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from labelkit_ext import _ext

# ---- example budgets --------------------------------------------------------------------------

CI_EXAMPLES = 40
FUZZ_EXAMPLES = 1000


def register_profiles() -> None:
    """``ci``: a fixed, reproducible budget for every CI run; ``fuzz``: a long random search."""
    override = os.environ.get("LABELKIT_FUZZ_EXAMPLES")
    common = dict(
        deadline=None,  # the machines are shared and sanitized runs are slow: no timing flakes
        print_blob=True,  # a failure prints the @reproduce_failure line
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "ci",
        max_examples=int(override or CI_EXAMPLES),
        derandomize=True,
        database=None,
        **common,
    )
    settings.register_profile("fuzz", max_examples=int(override or FUZZ_EXAMPLES), **common)


def profile_for(markexpr: str) -> str:
    """The profile for a ``-m`` expression: ``fuzz`` when it selects fuzz tests (not ``not fuzz``)."""
    return "fuzz" if re.search(r"(?<!not )\bfuzz\b", markexpr or "") else "ci"


# ---- sizes and shapes ---------------------------------------------------------------------------


def sizes(max_size: int = 9) -> st.SearchStrategy[int]:
    """A dimension size, 0 and 1 drawn often (empty and broadcast-like edge cases)."""
    return st.one_of(st.sampled_from([0, 1]), st.integers(0, max_size))


def shapes(
    min_dims: int = 1,
    max_dims: int = 4,
    max_size: int = 9,
    max_numel: int = 4096,
    min_last: int = 0,
) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes with sizes from :func:`sizes`; ``min_last`` bounds the last dimension from below."""

    def ok(shape: tuple[int, ...]) -> bool:
        return math.prod(shape) <= max_numel and (not shape or shape[-1] >= min_last)

    return st.lists(sizes(max_size), min_size=min_dims, max_size=max_dims).map(tuple).filter(ok)


# ---- memory layouts ------------------------------------------------------------------------------

#: Every layout :func:`arrange` produces. ``expanded`` repeats one slice along a dimension
#: (stride 0), so it changes the values: always compute the reference on the arranged tensor.
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "channels_last", "expanded")


def layouts() -> st.SearchStrategy[str]:
    return st.sampled_from(LAYOUTS)


def _gap_fill(t: torch.Tensor) -> torch.Tensor:
    """What lies in memory between the elements of a strided view: a value that changes any
    result it leaks into (a big logit, an out-of-range id)."""
    return torch.full_like(
        t, 1e4 if t.is_floating_point() else 2**40 if t.dtype == torch.int64 else 1
    )


def arrange(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` laid out in memory as ``layout`` says (see LAYOUTS); same shape, dtype, device.

    Layouts that do not apply to the tensor's rank (transposed below 2-D, channels_last outside
    4-D/5-D, expanded without a dimension) fall back to the nearest one that does.
    """
    nd = values.dim()
    if layout == "channels_last" and nd in (4, 5):
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        return values.contiguous(memory_format=fmt)
    if layout in ("transposed", "channels_last") and nd >= 2:
        return values.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided" and nd >= 1:
        # Every other element of a buffer twice as long in the last dimension.
        return torch.stack([values, _gap_fill(values)], dim=-1).flatten(-2)[..., 0::2]
    if layout == "offset":
        pad = _gap_fill(values.reshape(-1)[:1]).expand(3) if values.numel() else values.new_zeros(3)
        storage = torch.cat([pad.reshape(-1), values.reshape(-1)])
        return storage[3:].view(values.shape)
    if layout == "expanded" and nd >= 1:
        d = max(range(nd), key=lambda i: values.shape[i])  # the longest dimension
        return (
            values.narrow(d, 0, min(1, values.shape[d])).expand(values.shape)
            if values.shape[d]
            else values
        )
    return values.contiguous()


# ---- values ---------------------------------------------------------------------------------------


def extreme_values(dtype: torch.dtype) -> list[float]:
    """Special and boundary values of a floating dtype: ±inf, NaN, ±0, the largest finite,
    denormals, the smallest normal, and logits big enough to overflow a naive exp."""
    fi = torch.finfo(dtype)
    denormal = fi.smallest_normal / 4
    return [
        math.inf, -math.inf, math.nan, 0.0, -0.0,
        fi.max, -fi.max, fi.smallest_normal, denormal, -denormal,
        1e4, -1e4, 88.5, -87.5, 709.0, -745.0,
    ]  # fmt: skip


@st.composite
def float_tensors(
    draw,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    specials: bool = True,
) -> torch.Tensor:
    """Random values (a drawn scale, coarse rounding so ties occur) in ``shape``; with
    ``specials`` some elements and sometimes a whole last-dim slice (a "row") get values from
    :func:`extreme_values`."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 4.0, 50.0, 1e5]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()):
        x = (x * 2).round() / 2  # ties in argmax / equal logits
    n = x.numel()
    if specials and n:
        palette = extreme_values(dtype)
        flat = x.view(-1)
        for i, v in draw(
            st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(palette)), max_size=6)
        ):
            flat[i] = v
        if x.dim() >= 1 and x.shape[-1] and draw(st.booleans()):
            rows = x.view(-1, x.shape[-1])
            rows[draw(st.integers(0, rows.shape[0] - 1))] = draw(st.sampled_from(palette))
    return x.to(dtype=dtype, device=device)


def index_tensors(
    shape: Sequence[int], low: int, high: int, device: str = "cpu"
) -> st.SearchStrategy:
    """int64 tensors with every element in ``[low, high]``."""
    n = math.prod(shape)
    return st.lists(st.integers(low, high), min_size=n, max_size=n).map(
        lambda v: torch.tensor(v, dtype=torch.int64, device=device).reshape(tuple(shape))
    )


def out_of_range_ids(n: int) -> st.SearchStrategy[int]:
    """An index outside ``[0, n)``: just off either end, or near the int32/int64 limits."""
    return st.one_of(
        st.sampled_from([-1, n, n + 1, 2**31 - 1, 2**31, -(2**31), 2**63 - 1, -(2**63)]),
        st.integers(-(2**63), -1),
        st.integers(n, 2**63 - 1),
    )


# ---- devices and dtypes -----------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: dtypes an op taking floating-point input must reject.
NON_FLOAT_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)


def devices() -> st.SearchStrategy[str]:
    """The devices this machine can run: cpu, and cuda when a GPU is visible."""
    return st.sampled_from(DEVICES)


def other_device(device: str) -> str:
    """A device different from ``device`` for mismatch checks (``meta`` where no GPU exists)."""
    if device != "cpu":
        return "cpu"
    return "cuda" if "cuda" in DEVICES else "meta"


def registered_op(name: str, device: str) -> Callable | None:
    """``torch.ops.labelkit.<name>`` when this build has a kernel for ``device``, else None:
    for fuzzing the C++ checks with the Python wrapper bypassed."""
    return getattr(torch.ops.labelkit, name) if _ext.has_kernel(name, device) else None


def cpu_only_if(bad_values: bool, device: str) -> None:
    """Skips an example whose bad index values would reach a CUDA kernel: there they are a
    device-side assert, which ends the process's CUDA context (checked apart, in a child process,
    by :func:`assert_device_assert_in_child`)."""
    assume(not bad_values or device == "cpu")


def assert_device_assert_in_child(statements: str) -> None:
    """Runs ``statements`` (torch imported, the ops registered) in a child process, which must
    die of a device-side assert: the CUDA kernel stops on bad values, never skips them silently."""
    code = (
        "import torch, labelkit_ext\nlabelkit_ext.register_ops()\n"
        + statements
        + "\ntorch.cuda.synchronize()\n"
    )
    # -P: import the installed package, not the source tree of the working directory (which has
    # no compiled _C where the package was pip-installed).
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "device-side assert" in done.stderr, done.stderr[-2000:]


# ---- the outcome check ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    """A documented error: its type and a regex its message must match."""

    exc: type[BaseException] | tuple[type[BaseException], ...]
    match: str

    def accepts(self, error: BaseException) -> bool:
        return isinstance(error, self.exc) and re.search(self.match, str(error)) is not None


def assert_matches(actual: Any, expected: Any, exact: bool = False) -> None:
    """Same structure; tensors with equal shape, dtype and device, floating ones within the
    shared tolerance of their dtype (``exact``: bit for bit, for ops that only copy values; NaN
    where the reference has NaN either way), the rest exactly."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected, strict=True):
            assert_matches(a, e, exact)
        return
    if expected is None or not isinstance(expected, torch.Tensor):
        assert actual == expected, (actual, expected)
        return
    assert isinstance(actual, torch.Tensor), f"expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.device == expected.device, (actual.device, expected.device)
    if expected.is_floating_point():
        tol = dict(rtol=0, atol=0) if exact else TOLERANCES[expected.dtype]
        torch.testing.assert_close(
            actual.detach().cpu(), expected.detach().cpu(), equal_nan=True, **tol
        )
    else:
        assert torch.equal(actual.cpu(), expected.cpu()), (actual, expected)


def _sync_if_cuda() -> None:
    # Kernel faults on a GPU surface asynchronously: make them surface inside this check.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def check_op(
    call: Callable[[], Any],
    reference: Callable[[], Any] | None,
    expect: Sequence[Raises] = (),
    compare: Callable[[Any, Any], None] = assert_matches,
) -> Any:
    """Run ``call()`` and judge the outcome.

    ``expect`` lists the documented errors the input violates. Empty: the op must return, and
    ``compare(result, reference())`` must pass. Non-empty: the op must raise an error matching
    one of them (several rules may be broken at once; any of their errors is right).
    Returns the op's result (None when it raised as expected).
    """
    try:
        result = call()
        _sync_if_cuda()
    except Exception as error:  # noqa: BLE001 - judged below, re-raised when not documented
        if not expect:
            raise AssertionError(f"valid input raised {type(error).__name__}: {error}") from error
        if any(r.accepts(error) for r in expect):
            return None
        raise AssertionError(
            f"raised {type(error).__name__}: {error}\nexpected one of: {list(expect)}"
        ) from error
    if expect:
        raise AssertionError(f"bad input was accepted; expected one of: {list(expect)}")
    if reference is not None:
        compare(result, reference())
    return result
