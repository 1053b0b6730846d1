"""Fuzz tests of the pretext family (jigsaw_tiles, context_pair, rotate90, make_pretext_batch,
hamming_permutations) and of its registered ops with the wrapper bypassed: empty batches, 0-3
channels, images from the grid size (1-pixel cells) to 20 pixels a side and smaller than the
grid, every layout of the images and of the index tensors, tile sizes from 1 to too large,
jitter offsets inside and outside their cells, indices off either end, tables that are not
permutations, non-finite pixels, wrong dtypes, shapes, types and devices, and gradients. Each
input either matches the reference or raises the documented error (python_tests/fuzzing.py;
docs/testing.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import DEVICES, TOLERANCES
from fuzzing import (
    FLOAT_DTYPES,
    NON_FLOAT_DTYPES,
    Raises,
    arrange,
    assert_device_assert_in_child,
    assert_matches,
    check_op,
    cpu_only_if,
    devices,
    float_tensors,
    index_tensors,
    layouts,
    other_device,
    out_of_range_ids,
    registered_op,
)
from hypothesis import given
from hypothesis import strategies as st

from labelkit_ext import (
    PretextBatch,
    context_pair,
    hamming_permutations,
    jigsaw_tiles,
    make_pretext_batch,
    rotate90,
)
from labelkit_ext.ops.pretext import PRETEXT_TASKS, _random_offsets
from labelkit_ext.reference.pretext import (
    all_permutations,
    context_pair_ref,
    context_table,
    grid_tiles_ref,
    hamming_permutations_ref,
    jigsaw_tiles_ref,
    rotate90_ref,
    sampled_permutations,
    tile_dtype,
)

pytestmark = pytest.mark.fuzz

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8)
#: dtypes every pretext op must reject (uint8 images are supported).
REJECTED_DTYPES = tuple(d for d in NON_FLOAT_DTYPES if d not in SUPPORTED_DTYPES)
# Mostly the dtypes the ops are used with; now and then float64 or one they must reject.
ANY_DTYPE = st.sampled_from(
    [torch.float32, torch.float16, torch.bfloat16, torch.uint8] * 10
    + [torch.float64] * 4
    + list(REJECTED_DTYPES)
)
DTYPE_ERROR = "images must be float16, bfloat16, float32, float64 or uint8"
# Jigsaw grids 2-4; now and then one that is not an int >= 2.
GRIDS = st.sampled_from([2, 3, 4] * 15 + [1, 0, True, 3.0])
# Context grids: odd, >= 3; now and then an even, too small or non-int one.
CONTEXT_GRIDS = st.sampled_from([3] * 30 + [5] * 12 + [2, 4, 1, True, 3.0])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- inputs --------------------------------------------------------------------------------------


@st.composite
def image_shapes(draw, grid: int, square: bool = False, bad: bool = True) -> tuple[int, ...]:
    """``[N, C, H, W]``: N 0-3, C 1 or 3 (0 and 2 now and then), sides from ``grid`` (1-pixel
    cells) to 20; with ``bad``, now and then a side below the grid or a wrong rank."""
    n = draw(st.sampled_from([0, 1, 1, 2, 3]))
    c = draw(st.sampled_from([1, 3, 1, 3, 2, 0]))

    def side() -> int:
        if bad and grid > 0 and draw(st.integers(0, 29)) == 0:
            return draw(st.integers(0, grid - 1))
        return draw(st.integers(grid, 20))

    h = side()
    shape = (n, c, h, h if square else side())
    if bad and draw(st.integers(0, 29)) == 0:
        return draw(st.sampled_from([shape[1:], (*shape, 1)]))
    return shape


def _extreme_tiles(big: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A 4x4 image cut by a 2-grid into [[big, 0], [0, 0]], [[-big, 0], [0, 0]], zeros and
    [[big, -big], [0, 0]]."""
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = x[0, 0, 2, 2] = big
    x[0, 0, 0, 2] = x[0, 0, 2, 3] = -big
    return x.to(dtype=dtype, device=device)


def _standardised_jigsaw(x: torch.Tensor) -> torch.Tensor:
    index = torch.tensor([0], device=x.device)
    return jigsaw_tiles(x, index, torch.tensor([[0, 1, 2, 3]], device=x.device), 2, normalize=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, big",
    [
        (torch.float32, 1e30),
        (torch.float32, 3e38),
        (torch.float32, 1e-30),
        (torch.float32, 1e-41),  # subnormal
        (torch.float64, 1e300),
        (torch.float64, 1e-310),  # subnormal
        (torch.float16, 6e4),
        (torch.bfloat16, 3e38),
    ],
)
def test_normalize_extreme_tile_is_standardised(device, dtype, big):
    """Pixels whose squared deviations overflow (or underflow) the statistics' float type still
    give standardised tiles (issue 8: |x| > sqrt(max) gave 0 or NaN)."""
    tiles = _standardised_jigsaw(_extreme_tiles(big, dtype, device))
    spike = torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64) / math.sqrt(3.0)
    pair = torch.tensor([math.sqrt(2.0), -math.sqrt(2.0), 0.0, 0.0], dtype=torch.float64)
    expected = torch.stack([spike, -spike, torch.zeros(4, dtype=torch.float64), pair])
    actual = tiles[0, :, 0].flatten(1).double().cpu()
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, big",
    [(torch.float32, 1e30), (torch.float32, 3e38), (torch.float32, 1e-30), (torch.float64, 1e300)],
)
def test_normalize_extreme_tile_gradient_scales(device, dtype, big):
    """Standardising is scale invariant, so the gradient at pixels scaled by ``big`` is the one
    at unit pixels divided by ``big`` — also where the statistics alone would overflow."""
    w = torch.arange(16, dtype=dtype, device=device).view(1, 4, 1, 2, 2)

    def grad_at(x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_()
        (g,) = torch.autograd.grad((_standardised_jigsaw(x) * w).sum(), x)
        return g.double().cpu()

    scaled = grad_at(_extreme_tiles(big, dtype, device)) * big
    unit = grad_at(_extreme_tiles(1.0, dtype, device))
    assert unit.abs().max() > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(scaled, unit, **TOLERANCES[dtype])


@st.composite
def images(draw, shape, dtype, device) -> torch.Tensor:
    """Pixels of ``dtype`` in a drawn layout. Floating images come from ``float_tensors`` (ties,
    ±inf, NaN, denormals, ±max): a gather copies them as they are, and standardised tiles and
    their gradients follow the documented policy (a constant tile, all-inf ones too, gives 0
    with gradient 0; NaN propagates). Other dtypes: 0..255 or 0..1 (constant tiles)."""
    if dtype.is_floating_point:
        x = draw(float_tensors(shape, dtype))
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        high = draw(st.sampled_from([256, 2])) if dtype == torch.uint8 else 2
        x = torch.randint(0, high, tuple(shape), generator=g).to(dtype)
    return arrange(x.to(device), draw(layouts()))


@st.composite
def image_args(draw, grid: int, device: str, square: bool = False) -> torch.Tensor:
    """Images of any dtype (ANY_DTYPE) and shape (image_shapes), now and then needing
    gradients."""
    x = draw(images(draw(image_shapes(grid, square)), draw(ANY_DTYPE), device))
    if x.is_floating_point() and draw(st.integers(0, 4)) == 0:
        x.requires_grad_()
    return x


def as_argument(data, x: torch.Tensor) -> torch.Tensor | list:
    """``x``, or rarely its nested list (not a tensor: a TypeError)."""
    return x.tolist() if data.draw(st.integers(0, 29)) == 0 else x


def tile_sizes(largest: int) -> st.SearchStrategy:
    """None (the largest that fits), 1..largest, or now and then one too large, < 1 or not an
    int."""
    valid = st.integers(1, max(1, largest))
    bad = st.sampled_from([largest + 1, 2 * largest + 3, 0, -1, True, 2.0])
    return st.one_of(st.none(), st.none(), st.none(), valid, valid, valid, valid, valid, bad)


WRONG = ["dtype", "shape", "device", "type"]


@st.composite
def index_args(draw, n: int, high: int, device: str) -> torch.Tensor | list:
    """int64 ``[n]`` in ``[0, high)`` in a drawn layout; now and then one value out of range
    (out_of_range_ids) or a wrong dtype, shape, device or type."""
    idx = draw(index_tensors((n,), 0, max(high, 1) - 1))
    bad = draw(st.sampled_from([None] * 44 + ["range"] * 2 + WRONG))
    if bad == "range" and n:
        idx[draw(st.integers(0, n - 1))] = draw(out_of_range_ids(high))
    elif bad == "shape":
        idx = draw(st.sampled_from([idx[None], torch.cat([idx, idx.new_zeros(1)]), idx[1:]]))
        if idx.shape == (n,):  # idx[1:] of an empty index
            idx = idx[None]
    return _spoiled(draw, arrange(idx.to(device), draw(layouts())), bad, device)


@st.composite
def permutation_args(draw, m: int, device: str) -> torch.Tensor | list:
    """``[P, m]`` int64 rows that are permutations of ``0..m-1`` (P 1-5), in a drawn layout; now
    and then a row that repeats a value or holds one out of range, or a wrong shape, dtype,
    device or type."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    P = draw(st.integers(1, 5))
    perms = torch.stack([torch.randperm(m, generator=g) for _ in range(P)])
    bad = draw(st.sampled_from([None] * 44 + ["repeat", "value"] + WRONG))
    row, i = draw(st.integers(0, P - 1)), draw(st.integers(0, m - 1))
    if bad == "repeat":
        perms[row, i] = perms[row, (i + 1) % m]
    elif bad == "value":
        perms[row, i] = draw(out_of_range_ids(m))
    elif bad == "shape":
        perms = draw(
            st.sampled_from(
                [perms[:, :-1], torch.cat([perms, perms[:, :1]], 1), perms[0], perms[:0]]
            )
        )
    return _spoiled(draw, arrange(perms.to(device), draw(layouts())), bad, device)


@st.composite
def offset_args(
    draw, n: int, slots: int, room: tuple[int, int], device: str
) -> torch.Tensor | list | None:
    """None (centred tiles) or int64 ``[n, slots, 2]`` (dy, dx) with ``0 <= dy <= room[0]`` and
    ``0 <= dx <= room[1]`` in a drawn layout; now and then one value out of the cell or a wrong
    shape, dtype, device or type."""
    kind = draw(st.sampled_from([None] * 12 + ["valid"] * 32 + ["cell"] * 2 + WRONG))
    if kind is None:
        return None
    dy = draw(index_tensors((n, slots, 1), 0, max(room[0], 0)))
    dx = draw(index_tensors((n, slots, 1), 0, max(room[1], 0)))
    off = torch.cat([dy, dx], -1)
    if kind == "cell" and n and slots:
        axis = draw(st.integers(0, 1))
        where = (draw(st.integers(0, n - 1)), draw(st.integers(0, slots - 1)), axis)
        off[where] = draw(out_of_range_ids(max(room[axis], 0) + 1))
    elif kind == "shape":
        off = draw(
            st.sampled_from(
                [off[..., :1], torch.cat([off, off[..., :1]], -1), off[:, :-1], off[..., 0]]
                + [torch.cat([off, off.new_zeros(1, slots, 2)])]
            )
        )
    return _spoiled(draw, arrange(off.to(device), draw(layouts())), kind, device)


def _spoiled(draw, t: torch.Tensor, bad: str | None, device: str) -> torch.Tensor | list:
    """``t`` with the wrong dtype, device or type that ``bad`` names (otherwise as it is)."""
    if bad == "dtype":
        return t.to(draw(st.sampled_from([torch.int32, torch.float32, torch.uint8])))
    if bad == "device":
        return t.to(other_device(device))
    if bad == "type":
        return t.tolist()
    return t


# ---- the documented errors -----------------------------------------------------------------------


def _image_errors(op: str, x) -> list[Raises]:
    if not isinstance(x, torch.Tensor):
        return [Raises(TypeError, f"{op}: images must be a torch.Tensor")]
    errors = []
    if x.dtype not in SUPPORTED_DTYPES:
        errors.append(Raises(ValueError, f"{op}: {DTYPE_ERROR}"))
    if x.dim() != 4:
        errors.append(Raises(ValueError, rf"{op}: images must be 4-D \[N, C, H, W\]"))
    return errors


def _geometry(op: str, x: torch.Tensor, grid, size, name: str):
    """Errors of ``grid`` and of the tile size ``size`` (argument ``name``) for 4-D images, and
    the cell (h, w) and tile they give (None where an error stops the op first)."""
    if not _is_int(grid) or grid < 2:
        return [Raises(ValueError, f"{op}: grid must be an int >= 2")], None, None
    H, W = x.shape[-2:]
    if H < grid or W < grid:
        return (
            [Raises(ValueError, f"{op}: images of size {H}x{W} are smaller than the grid")],
            None,
            None,
        )
    cell = (H // grid, W // grid)
    largest = min(cell)
    if size is None:
        return [], cell, largest
    if not _is_int(size) or size < 1:
        return [Raises(ValueError, rf"{op}: {name} must be an int >= 1 or None")], cell, None
    if size > largest:
        msg = rf"{op}: {name}={size} is larger than a cell \({cell[0]}x{cell[1]} pixels\); "
        msg += f"at most {largest}$"
        return [Raises(ValueError, msg)], cell, None
    return [], cell, size


def _index_errors(
    op: str, name: str, idx, x: torch.Tensor, high: int | None, what: str
) -> list[Raises]:
    """``idx`` must be int64 ``[N]`` on the images' device with values in ``[0, high)`` (high
    None: not known, another argument is already wrong)."""
    if not isinstance(idx, torch.Tensor):
        return [Raises(TypeError, f"{op}: {name} must be a torch.Tensor")]
    N = x.shape[0]
    errors = []
    if idx.dtype != torch.int64:
        errors.append(Raises(ValueError, f"{op}: {name} must be int64"))
    if idx.dim() != 1 or idx.shape[0] != N:
        errors.append(Raises(ValueError, rf"{op}: {name} must have shape \[N\] = \[{N}\]"))
    if idx.device != x.device:
        errors.append(Raises(ValueError, f"{op}: {name} must be on the images' device"))
    if not errors and high is not None and N and not bool(((idx >= 0) & (idx < high)).all()):
        msg = rf"{op}: {name} must hold values in \[0, {high}\) \({re.escape(what)}\), got -?\d+$"
        errors.append(Raises(ValueError, msg))
    return errors


def _permutation_errors(op: str, perms, m: int | None, x: torch.Tensor) -> list[Raises]:
    """``perms`` must be int64 ``[P >= 1, m]`` on the images' device, each row a permutation of
    ``0..m-1`` (m None: the grid is already wrong)."""
    if not isinstance(perms, torch.Tensor):
        return [Raises(TypeError, f"{op}: permutations must be a torch.Tensor")]
    if m is None:
        return []
    errors = []
    if perms.dtype != torch.int64:
        errors.append(Raises(ValueError, f"{op}: permutations must be int64"))
    if perms.dim() != 2 or perms.shape[1] != m or perms.shape[0] < 1:
        msg = rf"{op}: permutations must have shape \[P >= 1, grid\*grid = {m}\]"
        errors.append(Raises(ValueError, msg))
    if perms.device != x.device:
        errors.append(Raises(ValueError, f"{op}: permutations must be on the images' device"))
    if not errors and not bool(
        (perms.sort(1).values == torch.arange(m, device=perms.device)).all()
    ):
        msg = rf"{op}: permutations must be permutations of 0\.\.{m - 1} \(grid\*grid - 1\); "
        msg += r"row \d+ is \["
        errors.append(Raises(ValueError, msg))
    return errors


def _offset_errors(
    op: str, off, x: torch.Tensor, slots: int, what: str, cell, tile
) -> list[Raises]:
    """``off`` None, or int64 ``[N, slots, 2]`` on the images' device with every (dy, dx) inside
    its cell (cell/tile None: not known, another argument is already wrong)."""
    if off is None:
        return []
    if not isinstance(off, torch.Tensor):
        return [Raises(TypeError, f"{op}: offsets must be a torch.Tensor or None")]
    N = x.shape[0]
    errors = []
    if off.dtype != torch.int64:
        errors.append(Raises(ValueError, f"{op}: offsets must be int64"))
    if tuple(off.shape) != (N, slots, 2):
        msg = rf"{op}: offsets must have shape \[N, {re.escape(what)}, 2\] = \[{N}, {slots}, 2\]"
        errors.append(Raises(ValueError, msg))
    if off.device != x.device:
        errors.append(Raises(ValueError, f"{op}: offsets must be on the images' device"))
    if not errors and N and tile is not None:
        room = torch.tensor([cell[0] - tile, cell[1] - tile], device=off.device)
        if bool(((off < 0) | (off > room)).any()):
            errors.append(
                Raises(ValueError, rf"{op}: offsets out of the cell: offsets\[\d+, \d+\] = ")
            )
    return errors


# ---- comparisons ---------------------------------------------------------------------------------


def assert_same(actual, expected) -> None:
    """``assert_matches`` with no tolerance: a gather copies values, so every element must be the
    reference's exactly (NaN where it has NaN)."""
    assert_matches(actual, expected, exact=True)


def compare_tiles(normalize: bool):
    """Plain tiles are copies (exact); standardised ones are float math, compared at the shared
    tolerance of their dtype (``conftest.TOLERANCES``)."""
    return assert_matches if normalize else assert_same


def _check_result_grad(result, x) -> None:
    """A result computed from images that need gradients needs them too (the ops are
    differentiable w.r.t. floating images)."""
    if result is None or not isinstance(x, torch.Tensor) or not x.requires_grad:
        return
    for t in result if isinstance(result, tuple) else (result,):
        assert t.requires_grad


# ---- jigsaw_tiles --------------------------------------------------------------------------------


@given(data=st.data())
def test_jigsaw_tiles_fuzz(data):
    """jigsaw_tiles on drawn images (every dtype, layout and odd shape; now and then needing
    gradients), grids, tile sizes, permutation tables, indices, jitter offsets and normalize:
    the reference's tiles, or one of the documented errors the arguments break."""
    op = "jigsaw_tiles"
    device = data.draw(devices())
    grid = data.draw(GRIDS)
    g = grid if _is_int(grid) and grid >= 2 else 3  # the grid the other arguments are drawn for
    x = data.draw(image_args(g, device))
    arg = as_argument(data, x)
    N = x.shape[0]
    cell = (x.shape[-2] // g, x.shape[-1] // g)
    tile_size = data.draw(tile_sizes(min(cell)))
    perms = data.draw(permutation_args(g * g, device))
    P = len(perms) if isinstance(perms, list) else perms.shape[0] if perms.dim() else 1
    perm_index = data.draw(index_args(N, P, device))
    t_drawn = min(cell) if tile_size is None or not _is_int(tile_size) else tile_size
    room = (cell[0] - t_drawn, cell[1] - t_drawn)
    offsets = data.draw(offset_args(N, g * g, room, device))
    normalize = data.draw(st.booleans())

    expect = _image_errors(op, arg)
    tile = None
    if arg is x and x.dim() == 4:
        errors, cell, tile = _geometry(op, x, grid, tile_size, "tile_size")
        m = grid * grid if _is_int(grid) and grid >= 2 else None
        perm_errors = _permutation_errors(op, perms, m, x)
        valid_p = not perm_errors and m is not None
        expect += errors + perm_errors
        expect += _index_errors(
            op, "perm_index", perm_index, x, P if valid_p else None, "rows of permutations"
        )
        expect += _offset_errors(op, offsets, x, g * g, "grid*grid", cell, tile)
    result = check_op(
        lambda: jigsaw_tiles(arg, perm_index, perms, grid, tile_size, offsets, normalize),
        lambda: jigsaw_tiles_ref(x, perm_index, perms, grid, tile, offsets, normalize),
        expect,
        compare_tiles(normalize),
    )
    _check_result_grad(result, x)


# ---- context_pair --------------------------------------------------------------------------------


@given(data=st.data())
def test_context_pair_fuzz(data):
    """context_pair as test_jigsaw_tiles_fuzz: odd grids (and even, small or non-int ones),
    positions in and out of 0..7, (center, neighbour) offsets."""
    op = "context_pair"
    device = data.draw(devices())
    grid = data.draw(CONTEXT_GRIDS)
    g = grid if _is_int(grid) and grid >= 2 else 3
    x = data.draw(image_args(g, device))
    arg = as_argument(data, x)
    N = x.shape[0]
    cell = (x.shape[-2] // g, x.shape[-1] // g)
    patch_size = data.draw(tile_sizes(min(cell)))
    position = data.draw(index_args(N, 8, device))
    p_drawn = min(cell) if patch_size is None or not _is_int(patch_size) else patch_size
    offsets = data.draw(offset_args(N, 2, (cell[0] - p_drawn, cell[1] - p_drawn), device))
    normalize = data.draw(st.booleans())

    expect = _image_errors(op, arg)
    patch = None
    if arg is x and x.dim() == 4:
        if not _is_int(grid) or grid < 3 or grid % 2 == 0:
            expect.append(Raises(ValueError, rf"{op}: grid must be an odd int >= 3 \(the center"))
            cell = None
        else:
            errors, cell, patch = _geometry(op, x, grid, patch_size, "patch_size")
            expect += errors
        what = "the 8 neighbours of the center"
        expect += _index_errors(op, "position", position, x, 8, what)
        expect += _offset_errors(op, offsets, x, 2, "2 (center, neighbour)", cell, patch)
    result = check_op(
        lambda: context_pair(arg, position, grid, patch_size, offsets, normalize),
        lambda: context_pair_ref(x, position, grid, patch, offsets, normalize),
        expect,
        compare_tiles(normalize),
    )
    _check_result_grad(result, x)


# ---- rotate90 ------------------------------------------------------------------------------------


def compare_rotations(x: torch.Tensor):
    """Exact values; channels-last images stay channels-last (documented)."""

    def compare(actual, expected):
        assert_same(actual, expected)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert actual.is_contiguous(memory_format=torch.channels_last), actual.stride()

    return compare


@given(data=st.data())
def test_rotate90_fuzz(data):
    """rotate90 on square images of 0-20 pixels a side (now and then not square) in every layout,
    quarter turns in and out of 0..3: the reference's rotation, channels-last kept."""
    op = "rotate90"
    device = data.draw(devices())
    square = data.draw(st.integers(0, 9)) > 0
    x = data.draw(image_args(0, device, square=square))
    arg = as_argument(data, x)
    k = data.draw(index_args(x.shape[0], 4, device))
    expect = _image_errors(op, arg)
    if not expect:
        H, W = x.shape[-2:]
        if H != W:
            expect.append(Raises(ValueError, f"{op}: images must be square, got {H}x{W}"))
        expect += _index_errors(op, "k", k, x, 4, "quarter turns")
    result = check_op(
        lambda: rotate90(arg, k),
        lambda: rotate90_ref(x, k),
        expect,
        compare_rotations(x) if not expect else None,
    )
    _check_result_grad(result, x)


# ---- gradients (the wrapper; compiled backward or the reference's autograd) ----------------------


@st.composite
def grad_images(draw, grid: int, device: str, square: bool = False) -> torch.Tensor:
    """Floating images in [-1, 1] in a drawn layout: here the layouts, shapes and tile geometry
    are under test, not the value range (a non-finite pixel has no gradient; see
    test_grid_tiles_backward_op_fuzz)."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    n, c = draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([1, 3, 2]))
    h = draw(st.integers(grid, 20))
    w = h if square else draw(st.integers(grid, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.rand((n, c, h, w), generator=g, dtype=torch.float64) * 2 - 1
    return arrange(x.to(device=device, dtype=dtype), draw(layouts()))


@st.composite
def output_grads(draw, shape, dtype, device) -> torch.Tensor:
    """An incoming gradient in [-1, 1], in a drawn layout."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 2 - 1
    return arrange(w.to(device=device, dtype=dtype), draw(layouts()))


def _grads(fn, x, ws):
    """d(sum of outputs * ws)/dx, with x a fresh leaf."""
    x = x.detach().requires_grad_()
    out = fn(x)
    outs = out if isinstance(out, tuple) else (out,)
    (gx,) = torch.autograd.grad(outs, x, ws)
    return gx


def gradient_scale(x, plain, w, normalize: bool) -> torch.Tensor:
    """Per pixel, the sum over the tiles that read it of the magnitudes of the terms of its
    gradient, in float64: ``|w|`` for plain tiles; for standardised ones
    ``inv_std * (|w| + |mean(w)| + |y| * |mean(w * y)|)``, the terms of
    ``dx = inv_std * (w - mean(w) - y * mean(w * y))`` (0 for a constant tile). ``plain(t)`` is
    the op's gather without normalize (``[N, K, C, t, t]``), ``w`` the incoming gradient."""
    xd = x.detach().double().requires_grad_()
    tiles = plain(xd)
    w = w.double()
    if normalize:
        t = tiles.detach()
        var, mean = torch.var_mean(t, dim=(-2, -1), keepdim=True, correction=0)
        inv_std = torch.where(var > 0, var.rsqrt(), torch.zeros_like(var))
        y = (t - mean) * inv_std
        mean_w = w.mean((-2, -1), keepdim=True)
        mean_wy = (w * y).mean((-2, -1), keepdim=True)
        w = inv_std * (w.abs() + mean_w.abs() + y.abs() * mean_wy.abs())
    (scale,) = torch.autograd.grad(tiles, xd, w.abs())
    return scale.cpu()


def assert_grads_close(gx, rx, x, scale: torch.Tensor | None) -> None:
    """``scale`` None: each pixel's gradient is one incoming value (tiles never overlap), copied
    exactly. Otherwise the gradient of standardised tiles is ``inv_std`` times a difference of
    O(|w|) terms that may cancel (``inv_std`` is 1e3 for pixels 1e-3 apart, or for a tile of
    two values 1e-3 apart in an expanded layout), and overlapping tiles add up terms that may
    cancel: each pixel is compared at the dtype's tolerance of the magnitude of its terms
    (``gradient_scale``), not of their sum."""
    assert gx.shape == x.shape and gx.dtype == x.dtype and gx.device == x.device
    if scale is None:
        assert torch.equal(gx.cpu(), rx.cpu()), (gx, rx)
        return
    assert torch.equal(gx.isnan().cpu(), rx.isnan().cpu()), (gx, rx)
    tol = TOLERANCES[x.dtype]
    excess = (gx.double().cpu() - rx.double().cpu()).abs().nan_to_num(0.0)
    excess -= tol["atol"] + tol["rtol"] * scale
    assert not bool((excess > 0).any()), (
        f"gradients differ beyond the tolerance by up to {excess.max().item():.3g}:\n{gx}\n{rx}"
    )


@given(data=st.data())
def test_jigsaw_tiles_grad_fuzz(data):
    """The gradient of jigsaw_tiles (the compiled backward op) w.r.t. images in every layout and
    floating dtype, for incoming gradients in every layout, against the reference's autograd:
    exact for plain tiles, at the dtype's tolerance of the terms for standardised ones."""
    device = data.draw(devices())
    grid = data.draw(st.sampled_from([2, 3, 4]))
    x = data.draw(grad_images(grid, device))
    N, C, H, W = x.shape
    cell = (H // grid, W // grid)
    tile = data.draw(st.integers(1, min(cell)))
    P = data.draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    perms = torch.stack([torch.randperm(grid * grid, generator=g) for _ in range(P)]).to(device)
    perm_index = data.draw(index_tensors((N,), 0, P - 1, device))
    room = (cell[0] - tile, cell[1] - tile)
    offsets = None
    if data.draw(st.booleans()):
        dy = data.draw(index_tensors((N, grid * grid, 1), 0, room[0], device))
        dx = data.draw(index_tensors((N, grid * grid, 1), 0, room[1], device))
        offsets = torch.cat([dy, dx], -1)
    normalize = data.draw(st.booleans())
    w = data.draw(output_grads((N, grid * grid, C, tile, tile), x.dtype, device))
    gx = _grads(lambda t: jigsaw_tiles(t, perm_index, perms, grid, tile, offsets, normalize), x, w)
    rx = _grads(
        lambda t: jigsaw_tiles_ref(t, perm_index, perms, grid, tile, offsets, normalize), x, w
    )

    def plain(t):
        return jigsaw_tiles_ref(t, perm_index, perms, grid, tile, offsets, False)

    assert_grads_close(gx, rx, x, gradient_scale(x, plain, w, True) if normalize else None)


@given(data=st.data())
def test_context_pair_grad_fuzz(data):
    """As test_jigsaw_tiles_grad_fuzz, for both outputs of context_pair."""
    device = data.draw(devices())
    grid = data.draw(st.sampled_from([3, 3, 5]))
    x = data.draw(grad_images(grid, device))
    N, C, H, W = x.shape
    cell = (H // grid, W // grid)
    patch = data.draw(st.integers(1, min(cell)))
    position = data.draw(index_tensors((N,), 0, 7, device))
    offsets = None
    if data.draw(st.booleans()):
        dy = data.draw(index_tensors((N, 2, 1), 0, cell[0] - patch, device))
        dx = data.draw(index_tensors((N, 2, 1), 0, cell[1] - patch, device))
        offsets = torch.cat([dy, dx], -1)
    normalize = data.draw(st.booleans())
    ws = tuple(data.draw(output_grads((N, C, patch, patch), x.dtype, device)) for _ in range(2))
    gx = _grads(lambda t: context_pair(t, position, grid, patch, offsets, normalize), x, ws)
    rx = _grads(lambda t: context_pair_ref(t, position, grid, patch, offsets, normalize), x, ws)

    def plain(t):
        return torch.stack(context_pair_ref(t, position, grid, patch, offsets, False), 1)

    scale = gradient_scale(x, plain, torch.stack(ws, 1), True) if normalize else None
    assert_grads_close(gx, rx, x, scale)


@given(data=st.data())
def test_rotate90_grad_fuzz(data):
    """rotate90's gradient (rotate90 by -k) equals the reference's exactly."""
    device = data.draw(devices())
    x = data.draw(grad_images(0, device, square=True))
    k = data.draw(index_tensors((x.shape[0],), 0, 3, device))
    w = data.draw(output_grads(x.shape, x.dtype, device))
    gx = _grads(lambda t: rotate90(t, k), x, w)
    rx = _grads(lambda t: rotate90_ref(t, k), x, w)
    assert_grads_close(gx, rx, x, None)


# ---- the registered ops, wrapper bypassed --------------------------------------------------------


def _tiles_read_outside(index, table, offsets, by_cell, grid, cell, tile) -> bool:
    """Whether some slot of some image would read outside its cell: its row of the table, that
    row's cell or the offsets it uses out of range (pretext::resolve_tile). Only the offsets of
    the cells (by_cell) or slots actually used count."""
    P, K = table.shape
    for n, row in enumerate(index.tolist()):
        if not 0 <= row < P:
            return True
        for k, c in enumerate(table[row].tolist()):
            if not 0 <= c < grid * grid:
                return True
            if offsets is not None:
                dy, dx = offsets[n, c if by_cell else k].tolist()
                if not (0 <= dy <= cell[0] - tile and 0 <= dx <= cell[1] - tile):
                    return True
    return False


@st.composite
def grid_tiles_args(draw, device: str, dtypes: st.SearchStrategy, malformed: bool = True):
    """Arguments of the registered ``grid_tiles`` op with the wrapper's checks bypassed: any
    table ``[P, K]`` (duplicate cells allowed, P 1-4, K 1-5 or grid*grid), offsets per cell or
    per slot, and now and then a value out of range in the index, the table or the offsets
    (out_of_range_ids), a tile too large or < 1, a grid < 2, images smaller than the grid or of
    a wrong dtype or rank, or an argument of the wrong dtype, shape or device (only values out
    of range without ``malformed``)."""
    grid = draw(st.sampled_from([2, 3, 4] * 5 + ([1, 0] if malformed else [])))
    g = max(grid, 2)
    m = g * g
    x = draw(images(draw(image_shapes(g, bad=malformed)), draw(dtypes), device))
    N = x.shape[0] if x.dim() else 0
    cell = (x.shape[-2] // g, x.shape[-1] // g) if x.dim() >= 2 else (1, 1)
    largest = min(cell)
    tile = draw(st.one_of(st.integers(1, max(largest, 1)), st.sampled_from([largest + 1, 0, -1])))
    if not malformed or draw(st.integers(0, 2)):
        tile = min(max(tile, 1), max(largest, 1))  # mostly valid
    by_cell = draw(st.booleans())
    P = draw(st.integers(1, 4))
    K = draw(st.sampled_from([m, m, 1, 2, 5]))
    table = draw(index_tensors((P, K), 0, m - 1))
    bad = draw(st.sampled_from([None] * 20 + ["value"] * 2 + WRONG[:3] * malformed))
    if bad == "value":
        table[draw(st.integers(0, P - 1)), draw(st.integers(0, K - 1))] = draw(out_of_range_ids(m))
    elif bad == "shape":
        table = draw(st.sampled_from([table[:, :0], table[:0], table[0]]))
    table = _spoiled(draw, arrange(table.to(device), draw(layouts())), bad, device)
    index = draw(index_tensors((N,), 0, P - 1))
    bad = draw(st.sampled_from([None] * 20 + ["range"] * 2 + WRONG[:3] * malformed))
    if bad == "range" and N:
        index[draw(st.integers(0, N - 1))] = draw(out_of_range_ids(P))
    elif bad == "shape":
        index = torch.cat([index, index.new_zeros(1)])
    index = _spoiled(draw, arrange(index.to(device), draw(layouts())), bad, device)
    slots = m if by_cell else K
    room = (cell[0] - max(tile, 1), cell[1] - max(tile, 1))
    offsets = None
    if draw(st.booleans()):
        dy = draw(index_tensors((N, slots, 1), 0, max(room[0], 0)))
        dx = draw(index_tensors((N, slots, 1), 0, max(room[1], 0)))
        offsets = torch.cat([dy, dx], -1)
        bad = draw(st.sampled_from([None] * 20 + ["cell"] * 2 + WRONG[:3] * malformed))
        if bad == "cell" and N:
            axis = draw(st.integers(0, 1))
            where = (draw(st.integers(0, N - 1)), draw(st.integers(0, slots - 1)), axis)
            offsets[where] = draw(out_of_range_ids(max(room[axis], 0) + 1))
        elif bad == "shape":
            offsets = draw(st.sampled_from([offsets[:, :-1], offsets[..., :1]]))
        offsets = _spoiled(draw, arrange(offsets.to(device), draw(layouts())), bad, device)
    normalize = draw(st.booleans())
    return x, index, table, grid, tile, offsets, by_cell, normalize


def _grid_tiles_errors(
    op, x, index, table, grid, tile, offsets, by_cell
) -> tuple[list[Raises], bool]:
    """The C++ argument checks of grid_tiles / _grid_tiles_backward (pretext_checks.h) that
    ``(x, index, table, grid, tile, offsets)`` violate; and whether none but the per-tile value
    checks can apply (the arguments are well-formed)."""
    errors = []
    if x.dtype not in SUPPORTED_DTYPES:
        errors.append(Raises(RuntimeError, f"{op}: {DTYPE_ERROR}"))
    if x.dim() != 4:
        return errors + [Raises(RuntimeError, rf"{op}: images must be 4-D \[N, C, H, W\]")], False
    H, W = x.shape[2:]
    if grid < 2:
        errors.append(Raises(RuntimeError, f"{op}: grid must be an int >= 2"))
    elif H < grid or W < grid:
        errors.append(
            Raises(RuntimeError, f"{op}: images of size {H}x{W} are smaller than the grid")
        )
    elif tile < 1:
        errors.append(Raises(RuntimeError, f"{op}: tile must be >= 1"))
    elif tile > min(H // grid, W // grid):
        errors.append(Raises(RuntimeError, rf"{op}: tile={tile} is larger than a cell"))
    N = x.shape[0]
    if index.dtype != torch.int64:
        errors.append(Raises(RuntimeError, f"{op}: index must be int64"))
    if index.dim() != 1 or index.shape[0] != N:
        errors.append(Raises(RuntimeError, rf"{op}: index must have shape \[N\] = \[{N}\]"))
    if index.device != x.device:
        errors.append(Raises(RuntimeError, f"{op}: index must be on the images' device"))
    if table.dtype != torch.int64:
        errors.append(Raises(RuntimeError, f"{op}: table must be int64"))
    if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        errors.append(Raises(RuntimeError, rf"{op}: table must have shape \[P >= 1, K >= 1\]"))
    if table.device != x.device:
        errors.append(Raises(RuntimeError, f"{op}: table must be on the images' device"))
    if offsets is not None:
        slots = grid * grid if by_cell else table.shape[-1]
        if offsets.dtype != torch.int64:
            errors.append(Raises(RuntimeError, f"{op}: offsets must be int64"))
        if tuple(offsets.shape) != (N, slots, 2):
            errors.append(Raises(RuntimeError, rf"{op}: offsets must have shape \[N, {slots}, 2\]"))
        if offsets.device != x.device:
            errors.append(Raises(RuntimeError, f"{op}: offsets must be on the images' device"))
    return errors, not errors


def _tile_value_errors(op, x, index, table, grid, tile, offsets, by_cell) -> list[Raises]:
    """The per-tile check of the kernels (index, cell and offsets values), which runs where a tile
    is copied: only for outputs that hold elements (N * C > 0)."""
    if x.shape[0] * x.shape[1] == 0:
        return []
    cell = (x.shape[2] // grid, x.shape[3] // grid)
    if not _tiles_read_outside(index.cpu(), table.cpu(), offsets, by_cell, grid, cell, tile):
        return []
    msg = rf"{op}: image \d+, slot \d+: index out of \[0, \d+\), cell out of \[0, \d+\) or "
    msg += r"offsets out of the cell \(index=-?\d+\)"
    return [Raises(RuntimeError, msg)]


def reference_tiles(x, index, table, grid, tile, offsets, by_cell, normalize) -> torch.Tensor:
    """grid_tiles_ref, except that an output with no elements (N * C == 0) is just its shape:
    the kernel reads no index, table or offsets value for it (so checks none), and the
    reference could not index with values out of range."""
    N, C = x.shape[:2]
    if N * C == 0:
        shape = (N, table.shape[1], C, tile, tile)
        return torch.empty(shape, dtype=tile_dtype(x.dtype, normalize), device=x.device)
    return grid_tiles_ref(x, index, table, grid, tile, offsets, by_cell, normalize)


@given(data=st.data())
def test_grid_tiles_op_fuzz(data):
    """The registered gather, Python bypassed: every argument check of pretext_checks.h raises
    its RuntimeError, and an index, cell or offset out of range raises in the kernel (never a
    read outside the image); anything else matches grid_tiles_ref, for any table."""
    device = data.draw(devices())
    op = registered_op("grid_tiles", device)
    if op is None:
        pytest.skip(f"no compiled grid_tiles kernel for {device}")
    dtypes = st.sampled_from(list(SUPPORTED_DTYPES) * 4 + list(REJECTED_DTYPES))
    x, index, table, grid, tile, offsets, by_cell, normalize = data.draw(
        grid_tiles_args(device, dtypes)
    )
    expect, well_formed = _grid_tiles_errors(
        "grid_tiles", x, index, table, grid, tile, offsets, by_cell
    )
    if well_formed:
        expect = _tile_value_errors("grid_tiles", x, index, table, grid, tile, offsets, by_cell)
        cpu_only_if(bool(expect), device)
    check_op(
        lambda: op(x, index, table, grid, tile, offsets, by_cell, normalize),
        lambda: reference_tiles(x, index, table, grid, tile, offsets, by_cell, normalize),
        expect,
        compare_tiles(normalize),
    )


@given(data=st.data())
def test_grid_tiles_backward_op_fuzz(data):
    """The registered backward, Python bypassed: bad index/table/offsets values raise per tile; a
    gradient of the wrong shape, dtype or device, or integer images, raise; otherwise the
    scatter-add (overlapping tiles of tables with repeated cells included) matches the
    reference's autograd."""
    device = data.draw(devices())
    op = registered_op("_grid_tiles_backward", device)
    if op is None:
        pytest.skip(f"no compiled _grid_tiles_backward kernel for {device}")
    dtypes = st.sampled_from(list(FLOAT_DTYPES) * 4 + [torch.uint8])
    # Well-formed arguments (test_grid_tiles_op_fuzz covers their checks; the backward runs the
    # same ones): here the values (non-finite and extreme pixels included: a constant tile,
    # all-inf ones too, has gradient 0, and NaN propagates), the gradient and the images' dtype
    # are under test.
    args = data.draw(grid_tiles_args(device, dtypes, malformed=False))
    x, index, table, grid, tile, offsets, by_cell, normalize = args
    name = "_grid_tiles_backward"
    expect, well_formed = _grid_tiles_errors(name, x, index, table, grid, tile, offsets, by_cell)
    assert well_formed, expect
    N, C = x.shape[:2]
    K = table.shape[1]
    gshape = [N, K, C, tile, tile]
    gdtype = x.dtype if x.is_floating_point() else torch.float32
    bad = data.draw(st.sampled_from([None] * 8 + ["shape", "dtype", "device"]))
    if bad == "shape":
        gshape[data.draw(st.integers(0, 4))] += 1
    if bad == "dtype":
        gdtype = data.draw(st.sampled_from([d for d in FLOAT_DTYPES if d != gdtype]))
    grad = data.draw(output_grads(gshape, gdtype, device))
    if bad == "device":
        grad = grad.to(other_device(device))
    if not x.is_floating_point():
        expect.append(Raises(RuntimeError, f"{name}: gradients need floating-point images"))
    if bad in ("shape", "dtype"):
        expect.append(
            Raises(
                RuntimeError,
                rf"{name}: grad must be \[{N}, {K}, {C}, {tile}, {tile}\] of the images' dtype",
            )
        )
    if bad == "device":
        expect.append(Raises(RuntimeError, f"{name}: grad must be on the images' device"))
    if not expect and grad.numel():
        expect = _tile_value_errors(name, x, index, table, grid, tile, offsets, by_cell)
        cpu_only_if(bool(expect), device)

    def forward(t):
        return grid_tiles_ref(t, index, table, grid, tile, offsets, by_cell, normalize)

    def reference():
        if not x.numel():  # nothing to scatter; index values unread (see reference_tiles)
            return torch.zeros_like(x)
        return _grads(forward, x, grad)

    def compare(actual, expected):
        # A table row that repeats a cell reads its pixels again: their gradients add up, in
        # the images' dtype, and may cancel (assert_grads_close).
        if not x.numel():
            assert actual.shape == x.shape and actual.dtype == x.dtype
            return

        def plain(t):
            return grid_tiles_ref(t, index, table, grid, tile, offsets, by_cell, False)

        assert_grads_close(actual, expected, x, gradient_scale(x, plain, grad, normalize))

    check_op(
        lambda: op(grad, x, index, table, grid, tile, offsets, by_cell, normalize),
        reference,
        expect,
        compare,
    )


@given(data=st.data())
def test_rotate90_op_fuzz(data):
    """The registered rotate90, Python bypassed: k of the wrong dtype, shape or device, or a
    quarter-turn count out of [0, 4), raises (never a read outside the image)."""
    device = data.draw(devices())
    op = registered_op("rotate90", device)
    if op is None:
        pytest.skip(f"no compiled rotate90 kernel for {device}")
    dtypes = st.sampled_from(list(SUPPORTED_DTYPES) * 4 + list(REJECTED_DTYPES))
    square = data.draw(st.integers(0, 9)) > 0
    x = data.draw(images(data.draw(image_shapes(0, square)), data.draw(dtypes), device))
    N = x.shape[0] if x.dim() else 0
    k = data.draw(index_tensors((N,), 0, 3))
    bad = data.draw(st.sampled_from([None] * 12 + ["range"] * 3 + ["dtype", "shape", "device"]))
    if bad == "range" and N:
        k[data.draw(st.integers(0, N - 1))] = data.draw(out_of_range_ids(4))
    elif bad == "shape":
        k = torch.cat([k, k.new_zeros(1)])
    k = _spoiled(data.draw, arrange(k.to(device), data.draw(layouts())), bad, device)
    expect = []
    if x.dtype not in SUPPORTED_DTYPES:
        expect.append(Raises(RuntimeError, f"rotate90: {DTYPE_ERROR}"))
    if x.dim() != 4:
        expect.append(Raises(RuntimeError, r"rotate90: images must be 4-D \[N, C, H, W\]"))
    elif x.shape[2] != x.shape[3]:
        expect.append(Raises(RuntimeError, "rotate90: images must be square"))
    if k.dtype != torch.int64:
        expect.append(Raises(RuntimeError, "rotate90: k must be int64"))
    if k.dim() != 1 or k.shape[0] != N:
        expect.append(Raises(RuntimeError, rf"rotate90: k must have shape \[N\] = \[{N}\]"))
    if k.device != x.device:
        expect.append(Raises(RuntimeError, "rotate90: k must be on the images' device"))
    if not expect and x.numel() and not bool(((k >= 0) & (k < 4)).all()):
        expect.append(
            Raises(RuntimeError, r"rotate90: k must hold values in \[0, 4\) \(quarter turns\)")
        )
        cpu_only_if(True, device)
    # An empty output reads no k value (so checks none), and the reference could not index
    # with one out of range: it is just the images' shape.
    reference = (lambda: rotate90_ref(x, k)) if x.numel() else (lambda: torch.empty_like(x))
    check_op(lambda: op(x, k), reference, expect, compare_rotations(x))


_BAD_INDEX_SETUP = (
    "x = torch.randn(1, 1, 4, 4, device='cuda')\n"
    "table = torch.tensor([[0, 1, 2, 3]], device='cuda')\n"
    "bad = torch.tensor([1], device='cuda')\n"  # the table has one row
    "g = torch.randn(1, 4, 1, 2, 2, device='cuda')\n"
)


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "call",
    [
        "torch.ops.labelkit.grid_tiles(x, bad, table, 2, 2, None, False, False)",
        "torch.ops.labelkit.grid_tiles(x, bad, table, 2, 2, None, False, True)",
        "torch.ops.labelkit._grid_tiles_backward(g, x, bad, table, 2, 2, None, False, False)",
        "torch.ops.labelkit._grid_tiles_backward(g, x, bad, table, 2, 2, None, False, True)",
        "torch.ops.labelkit.rotate90(x, torch.tensor([4], device='cuda'))",
    ],
    ids=["tiles", "tiles_normalize", "backward", "backward_normalize", "rotate90"],
)
def test_pretext_cuda_op_asserts_on_bad_ids(call):
    """The CUDA kernels, Python bypassed, stop on a table row or k out of range with a
    device-side assert (the CPU kernels raise), never a silent zero tile. Apart: the assert ends
    the CUDA context."""
    assert_device_assert_in_child(_BAD_INDEX_SETUP + call)


# ---- make_pretext_batch --------------------------------------------------------------------------


@given(data=st.data())
def test_make_pretext_batch_fuzz(data):
    """Every task on drawn images, grids, tile sizes, tables, jitter, normalize and
    all_rotations, with a seeded generator: the batch is the reference's tiles (or rotations)
    for the labels and jitter offsets that the same seed draws (labels first, then offsets), or
    the documented error (a rotation of non-square images: rotate90's)."""
    op = "make_pretext_batch"
    device = data.draw(devices())
    task = data.draw(st.sampled_from(PRETEXT_TASKS * 4 + ("colorize",)))
    grid = data.draw(
        GRIDS if task == "jigsaw" else CONTEXT_GRIDS if task == "context" else st.just(3)
    )
    g = grid if _is_int(grid) and grid >= 2 else 3
    x = data.draw(image_args(g, device, square=data.draw(st.integers(0, 4)) > 0))
    arg = as_argument(data, x)
    cell = (x.shape[-2] // g, x.shape[-1] // g)
    tile_size = data.draw(tile_sizes(min(cell)))
    # The default tables of grids >= 3 take seconds to build (the battery's
    # test_make_pretext_batch uses them): here only grid 2's (all 24) is left to the op.
    perms = data.draw(permutation_args(g * g, device))
    if grid == 2 and data.draw(st.booleans()):
        perms = None
    seed = data.draw(st.integers(0, 2**63 - 1))
    bad_generator = data.draw(st.integers(0, 29)) == 0
    generator = seed if bad_generator else torch.Generator().manual_seed(seed)
    jitter, normalize = data.draw(st.booleans()), data.draw(st.booleans())
    all_rotations = data.draw(st.booleans())

    expect = _image_errors(op, arg)
    if task not in PRETEXT_TASKS:
        expect.append(Raises(ValueError, f"{op}: task must be one of"))
    if bad_generator:
        expect.append(Raises(TypeError, f"{op}: generator must be a torch.Generator or None"))
    tile = table = None
    if not expect and task == "rotation":
        H, W = x.shape[-2:]
        if H != W:
            expect.append(Raises(ValueError, f"rotate90: images must be square, got {H}x{W}"))
    elif not expect:
        if task == "context" and (not _is_int(grid) or grid < 3 or grid % 2 == 0):
            expect.append(Raises(ValueError, rf"{op}: grid must be an odd int >= 3"))
        else:
            errors, cell, tile = _geometry(op, x, grid, tile_size, "tile_size")
            expect += errors
        if task == "jigsaw" and not expect:
            if perms is None:  # documented default for grid 2: all 24 permutations
                table = hamming_permutations(24, 2).to(device)
            else:
                expect += _permutation_errors(op, perms, grid * grid, x)
                table = perms
        elif task == "context" and not expect:
            table = context_table(grid, device)

    def reference():
        N = x.shape[0]
        gen = torch.Generator().manual_seed(seed)
        if task == "rotation":
            if all_rotations:
                k = torch.arange(4, device=device).repeat(N)
                return PretextBatch(rotate90_ref(x.repeat_interleave(4, dim=0), k), k, 4)
            k = torch.randint(4, (N,), generator=gen).to(device)
            return PretextBatch(rotate90_ref(x, k), k, 4)
        labels = torch.randint(table.shape[0], (N,), generator=gen).to(device)
        offsets = None
        if jitter and N and min(cell) > tile:
            # The implementation's draw (uniform in [0, cell - t] per slot), from the same seed.
            offsets = _random_offsets(N, table.shape[1], cell, tile, gen, "cpu").to(device)
        inputs = grid_tiles_ref(x, labels, table, grid, tile, offsets, task == "jigsaw", normalize)
        return PretextBatch(inputs, labels, table.shape[0])

    result = check_op(
        lambda: make_pretext_batch(
            arg,
            task,
            generator,
            grid=grid,
            tile_size=tile_size,
            permutations=perms,
            jitter=jitter,
            normalize=normalize,
            all_rotations=all_rotations,
        ),
        reference,
        expect,
        compare_tiles(normalize and task != "rotation"),
    )
    if result is not None and task != "rotation":
        assert result.inputs.dtype == tile_dtype(x.dtype, normalize)
    _check_result_grad(result.inputs if result is not None else None, x)


# ---- hamming_permutations ------------------------------------------------------------------------


def _assert_greedy_hamming(perms, grid, seed, criterion, num_candidates) -> None:
    """The op's own reference is its implementation, so check the greedy choice independently:
    over the same candidate table, each row is the unchosen candidate whose minimum ('max') or
    summed ('mean') Hamming distance to the rows before it is largest, the first on ties, with
    distances recomputed from scratch each step (the paper code's O(n^2 M))."""
    m = grid * grid
    generator = torch.Generator().manual_seed(seed)
    if math.factorial(m) <= num_candidates:
        cands = all_permutations(m).long()
    else:
        cands = sampled_permutations(m, num_candidates, generator).long()
    first = int(torch.randint(len(cands), (1,), generator=generator))
    hits = (cands[None] == perms[:, None]).all(-1)  # [n, M]
    assert bool((hits.sum(1) == 1).all()), "a row that is no candidate"
    rows = hits.int().argmax(1).tolist()
    assert rows[0] == first
    for j in range(1, len(rows)):
        dist = (cands[:, None, :] != cands[rows[:j]][None]).sum(-1)  # [M, j]
        score = (dist.min(1).values if criterion == "max" else dist.sum(1)).double()
        score[rows[:j]] = -1.0
        assert rows[j] == int(score.argmax()), (j, rows[j], int(score.argmax()))


@given(data=st.data())
def test_hamming_permutations_fuzz(data):
    """Argument checks (grid, criterion, seed, num_candidates, n), and for valid arguments: the
    reference's set, ``[n, grid^2]`` int64 on the CPU, every row a permutation, no row twice
    (each pick is "among all candidates not yet chosen")."""
    op = "hamming_permutations"
    grid = data.draw(st.sampled_from([2, 2, 3, 4] * 3 + [16, 17, 1, 0, True, 3.0]))  # 16+: int16
    criterion = data.draw(st.sampled_from(["max", "mean"] * 4 + ["min", "MAX"]))
    seed = data.draw(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1),  # torch.Generator's seed range
            st.integers(0, 9),
            st.sampled_from([1.5, "0", None, True]),
        )
    )
    num_candidates = data.draw(
        st.one_of(st.none(), st.integers(1, 40), st.sampled_from([0, -1, True, 2.0]))
    )
    if num_candidates is None and grid != 2:
        # Grid 3 enumerates 362,880 candidates, grid 4 draws 100,000: a second or more each (the
        # battery covers those defaults); here grid 2's 24 and small sampled sets.
        num_candidates = data.draw(st.integers(1, 40))
    expect = []
    available = resolved = None
    if not _is_int(grid) or grid < 2:
        expect.append(Raises(ValueError, f"{op}: grid must be an int >= 2"))
    if criterion not in ("max", "mean"):
        expect.append(Raises(ValueError, f"{op}: criterion must be one of"))
    if not _is_int(seed):
        expect.append(Raises(ValueError, f"{op}: seed must be an int"))
    if num_candidates is not None and (not _is_int(num_candidates) or num_candidates < 1):
        expect.append(Raises(ValueError, rf"{op}: num_candidates must be an int >= 1 or None"))
    elif _is_int(grid) and grid >= 2:
        total = math.factorial(grid * grid)
        resolved = num_candidates or (total if grid <= 3 else 100_000)
        available = min(total, resolved)
    n = data.draw(
        st.one_of(
            st.integers(1, min(available or 1, 30)),
            st.integers(1, min(available or 1, 30)),
            st.sampled_from([0, -1, (available or 1) + 1, True, 2.0]),
        )
    )
    if available is not None and (not _is_int(n) or not 1 <= n <= available):
        expect.append(
            Raises(ValueError, rf"{op}: n must be an int in \[1, {available}\] for grid={grid}")
        )

    def compare(actual, expected):
        assert_same(actual, expected)
        _assert_greedy_hamming(actual, grid, seed, criterion, resolved)
        assert actual.shape == (n, grid * grid) and actual.device.type == "cpu"
        assert bool((actual.sort(1).values == torch.arange(grid * grid)).all()), actual
        assert torch.unique(actual, dim=0).shape[0] == n, f"a row chosen twice: {actual.tolist()}"

    check_op(
        lambda: hamming_permutations(n, grid, seed, criterion, num_candidates=num_candidates),
        lambda: hamming_permutations_ref(n, grid, seed, criterion, resolved),
        expect,
        compare,
    )
