"""The fuzz helpers themselves: layouts really are what they say, and check_op fails every
outcome it should (a checker that cannot fail is a bug)."""

from __future__ import annotations

import math

import pytest
import torch
from fuzzing import (
    LAYOUTS,
    Raises,
    arrange,
    check_op,
    extreme_values,
    float_tensors,
    out_of_range_ids,
    profile_for,
    shapes,
)
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4), (5,), (0, 3), ()])
def test_arrange_keeps_shape_and_values(layout, shape):
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    y = arrange(x, layout)
    assert y.shape == x.shape and y.dtype == x.dtype
    if layout != "expanded":
        assert torch.equal(y, x)


def test_arrange_layouts_are_what_they_say():
    x = torch.randn(2, 3, 4, 5)
    assert arrange(x, "channels_last").is_contiguous(memory_format=torch.channels_last)
    assert not arrange(x, "channels_last").is_contiguous()
    assert not arrange(x, "transposed").is_contiguous()
    assert arrange(x, "strided").stride(-1) == 2
    assert arrange(x, "offset").storage_offset() == 3
    assert 0 in arrange(x, "expanded").stride()
    # The gaps of a strided view hold a sentinel, not copies of the values.
    y = arrange(x, "strided")
    flat = torch.as_strided(y, (y.numel() * 2,), (1,), y.storage_offset())
    assert (flat[1::2] == 1e4).all()


@given(shapes(min_dims=0, max_dims=4, min_last=1))
def test_shapes_respect_bounds(shape):
    assert len(shape) <= 4 and math.prod(shape) <= 4096
    assert not shape or shape[-1] >= 1


@given(st.data())
def test_float_tensors_have_the_asked_shape_and_dtype(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    x = data.draw(float_tensors((3, 4), dtype))
    assert x.shape == (3, 4) and x.dtype == dtype


SEARCH = settings(max_examples=500, database=None, derandomize=True)
FLOAT32_TINY = torch.finfo(torch.float32).smallest_normal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_tensors_draw_specials(dtype):
    """The fuzz inputs do reach NaN, both infinities, denormals and ties (else the fuzz tests
    would never exercise those paths); without ``specials`` they stay clear of NaN/inf/denormal
    (finite scales may still overflow float16)."""
    tiny = torch.finfo(dtype).smallest_normal
    kinds = {
        "nan": lambda x: bool(x.isnan().any()),
        "+inf": lambda x: bool((x == math.inf).any()),
        "-inf": lambda x: bool((x == -math.inf).any()),
        "denormal": lambda x: bool(((x != 0) & (x.abs() < tiny)).any()),
        "tie": lambda x: x.numel() > torch.unique(x).numel(),
    }
    for kind, present in kinds.items():
        try:
            find(float_tensors((3, 4), dtype), present, settings=SEARCH)
        except NoSuchExample:
            pytest.fail(f"float_tensors never drew a {kind} in {dtype}")
    with pytest.raises(NoSuchExample):
        find(
            float_tensors((3, 4), torch.float32, specials=False),
            lambda x: bool(x.isnan().any() or ((x != 0) & (x.abs() < FLOAT32_TINY)).any()),
            settings=SEARCH,
        )


def test_extreme_values_are_representable():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.tensor(extreme_values(dtype), dtype=torch.float64).to(dtype)
        assert t.isnan().sum() == 1 and t.isinf().sum() >= 2
        denormal = t[(t != 0) & (t.abs() < torch.finfo(dtype).smallest_normal)]
        assert denormal.numel() == 2  # the subnormals survive the cast


@given(st.integers(1, 100), st.data())
def test_out_of_range_ids_are_out_of_range(n, data):
    i = data.draw(out_of_range_ids(n))
    assert not 0 <= i < n


def test_profile_for():
    assert profile_for("fuzz") == "fuzz"
    assert profile_for("ops or fuzz") == "fuzz"
    assert profile_for("not fuzz") == "ci"
    assert profile_for("not slow") == "ci"
    assert profile_for("") == "ci"


# ---- check_op must fail every wrong outcome ----------------------------------------------------------


def _raise(exc):
    def call():
        raise exc

    return call


def test_check_op_passes_matching_results_and_documented_errors():
    x = torch.randn(3)
    check_op(lambda: x * 2, lambda: x + x)
    check_op(_raise(ValueError("f: k must be >= 0")), None, [Raises(ValueError, "k must be")])
    check_op(  # several rules broken: any of their errors will do
        _raise(TypeError("f: x must be a tensor")),
        None,
        [Raises(ValueError, "k must be"), Raises(TypeError, "must be a tensor")],
    )


@pytest.mark.parametrize(
    "call,reference,expect,complaint",
    [
        (lambda: torch.ones(3), lambda: torch.zeros(3), [], "not close"),
        (lambda: torch.ones(3), lambda: torch.ones(4), [], "torch.Size"),
        (lambda: torch.ones(3), lambda: torch.ones(3, dtype=torch.float64), [], "float"),
        (lambda: torch.tensor([1, 2]), lambda: torch.tensor([1, 3]), [], "tensor"),
        (
            lambda: (torch.ones(1), None),
            lambda: (torch.ones(1), torch.ones(1)),
            [],
            "expected a tensor",
        ),
        (_raise(RuntimeError("boom")), lambda: torch.ones(1), [], "valid input raised"),
        (lambda: torch.ones(1), None, [Raises(ValueError, "k")], "bad input was accepted"),
        (_raise(ValueError("other")), None, [Raises(ValueError, "k must")], "expected one of"),
        (_raise(RuntimeError("k must")), None, [Raises(ValueError, "k must")], "expected one of"),
    ],
)
def test_check_op_fails_wrong_outcomes(call, reference, expect, complaint):
    with pytest.raises(AssertionError, match=complaint):
        check_op(call, reference, expect)


def test_check_op_nan_must_match_nan():
    check_op(lambda: torch.tensor([math.nan, 1.0]), lambda: torch.tensor([math.nan, 1.0]))
    with pytest.raises(AssertionError):
        check_op(lambda: torch.tensor([math.nan, 1.0]), lambda: torch.tensor([0.0, 1.0]))
