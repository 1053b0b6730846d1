"""Pretext-task op family: jigsaw permutation sets and tiles, context patch pairs, rotations, and
:func:`make_pretext_batch`, which builds a whole labelled batch in one call.

The tile ops are one gather kernel, ``torch.ops.labelkit.grid_tiles`` (see
``labelkit_ext/reference/pretext.py`` for the cell/tile geometry); ``rotate90`` is its own
kernel. Each public function validates its arguments (messages shared with the C++
``TORCH_CHECK``s), then calls the compiled kernel when this build has one for the tensor's
device and the pure-PyTorch reference otherwise. Checks that read tensor data (index ranges,
that permutations are permutations) run eagerly and are skipped under ``torch.compile``; the
kernels then still never read out of bounds (CPU raises, CUDA stops with a device-side assert).

Gradients: the ops are gathers, so their backward is a scatter-add into the image, registered
as its own op (``_grid_tiles_backward``; ``rotate90``'s backward is ``rotate90`` by ``-k``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from labelkit_ext._ext import HAS_OPS, has_kernel
from labelkit_ext.ops._args import as_int, ints_where_possible, reads_data
from labelkit_ext.ops._autograd import no_double_backward
from labelkit_ext.reference.pretext import (
    cell_size,
    context_table,
    grid_tiles_ref,
    hamming_permutations_ref,
    rotate90_ref,
    tile_dtype,
)

__all__ = [
    "HammingStats",
    "PretextBatch",
    "PRETEXT_TASKS",
    "candidate_count",
    "context_pair",
    "hamming_distance_stats",
    "hamming_permutations",
    "jigsaw_tiles",
    "make_pretext_batch",
    "rotate90",
]

_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8)
_CRITERIA = ("max", "mean")
#: Tasks :func:`make_pretext_batch` builds.
PRETEXT_TASKS = ("jigsaw", "context", "rotation")
#: Candidates drawn for grids whose (grid^2)! permutations are too many to enumerate (grid >= 4).
DEFAULT_NUM_CANDIDATES = 100_000
# Grids 2 and 3 ((grid^2)! <= 9!) can use every permutation as a candidate; from grid 4 on,
# 16! > 2e13 exceeds any candidate table, so (grid^2)! is never computed there.
_MAX_ENUMERATED_CELLS = 9
#: The most candidate-table entries (candidates x grid^2) hamming_permutations builds (1 GiB int64).
MAX_TABLE_ENTRIES = 2**27


class HammingStats(NamedTuple):
    """Pairwise Hamming distances of a permutation set (over all pairs of distinct rows)."""

    min_distance: int
    mean_distance: float


class PretextBatch(NamedTuple):
    """A labelled pretext batch from :func:`make_pretext_batch`.

    inputs:      jigsaw ``[N, grid^2, C, t, t]`` shuffled tiles; context ``[N, 2, C, p, p]``
                 (center, neighbour); rotation ``[N, C, H, W]`` (``[4N, ...]`` with
                 ``all_rotations``).
    labels:      ``[N]`` int64 on the images' device: the permutation index, the neighbour
                 position (0..7) or the number of quarter turns (0..3).
    num_classes: number of label values (permutations, 8 or 4).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    num_classes: int


# ---- argument checks ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_images(images: object, op: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{op}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype not in _IMAGE_DTYPES:
        raise ValueError(
            f"{op}: images must be float16, bfloat16, float32, float64 or uint8, got {images.dtype}"
        )
    if images.dim() != 4:
        raise ValueError(f"{op}: images must be 4-D [N, C, H, W], got shape {tuple(images.shape)}")
    return images


def _check_grid(grid: object, op: str, images: torch.Tensor) -> int:
    value = as_int(grid)
    if value is None or value < 2:
        raise ValueError(f"{op}: grid must be an int >= 2, got {grid!r}")
    grid = value
    H, W = images.shape[-2:]
    if H < grid or W < grid:
        raise ValueError(
            f"{op}: images of size {H}x{W} are smaller than the grid ({grid}x{grid} cells need "
            f"at least {grid} pixels per side)"
        )
    return grid


def _check_tile(tile: object, name: str, op: str, cell: tuple[int, int]) -> int:
    largest = min(cell)
    if tile is None:
        return largest
    value = as_int(tile)
    if value is None or value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1 or None, got {tile!r}")
    tile = value
    if tile > largest:
        raise ValueError(
            f"{op}: {name}={tile} is larger than a cell ({cell[0]}x{cell[1]} pixels); "
            f"at most {largest}"
        )
    return tile


def _check_index(
    index: object, name: str, op: str, images: torch.Tensor, high: int, what: str
) -> torch.Tensor:
    """``index`` must be int64 ``[N]`` on the images' device with values in ``[0, high)``."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be int64, got {index.dtype}")
    N = images.shape[0]
    if index.dim() != 1 or index.shape[0] != N:
        raise ValueError(f"{op}: {name} must have shape [N] = [{N}], got {list(index.shape)}")
    if index.device != images.device:
        raise ValueError(
            f"{op}: {name} must be on the images' device ({images.device}), got {index.device}"
        )
    if N and reads_data(index):
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < 0 or hi >= high:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: {name} must hold values in [0, {high}) ({what}), got {bad}")
    return index


def _check_permutations(
    permutations: object, op: str, grid: int, device: torch.device
) -> torch.Tensor:
    if not isinstance(permutations, torch.Tensor):
        raise TypeError(
            f"{op}: permutations must be a torch.Tensor, got {type(permutations).__name__}"
        )
    m = grid * grid
    if permutations.dtype != torch.int64:
        raise ValueError(f"{op}: permutations must be int64, got {permutations.dtype}")
    if permutations.dim() != 2 or permutations.shape[1] != m or permutations.shape[0] < 1:
        raise ValueError(
            f"{op}: permutations must have shape [P >= 1, grid*grid = {m}], got "
            f"{list(permutations.shape)}"
        )
    if permutations.device != device:
        raise ValueError(
            f"{op}: permutations must be on the images' device ({device}), got {permutations.device}"
        )
    if reads_data(permutations):
        expected = torch.arange(m, device=permutations.device)
        ok = (permutations.sort(dim=1).values == expected).all(dim=1)
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"{op}: permutations must be permutations of 0..{m - 1} (grid*grid - 1); row {row} "
                f"is {permutations[row].tolist()}"
            )
    return permutations


def _check_offsets(
    offsets: object,
    op: str,
    images: torch.Tensor,
    slots: int,
    cell: tuple[int, int],
    tile: int,
    what: str,
) -> torch.Tensor | None:
    """``offsets`` int64 ``[N, slots, 2]`` (dy, dx) with ``0 <= dy <= cell_h - t`` and
    ``0 <= dx <= cell_w - t``: every tile lies inside its cell."""
    if offsets is None:
        return None
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(
            f"{op}: offsets must be a torch.Tensor or None, got {type(offsets).__name__}"
        )
    if offsets.dtype != torch.int64:
        raise ValueError(f"{op}: offsets must be int64, got {offsets.dtype}")
    N = images.shape[0]
    if offsets.dim() != 3 or tuple(offsets.shape) != (N, slots, 2):
        raise ValueError(
            f"{op}: offsets must have shape [N, {what}, 2] = [{N}, {slots}, 2], got "
            f"{list(offsets.shape)}"
        )
    if offsets.device != images.device:
        raise ValueError(
            f"{op}: offsets must be on the images' device ({images.device}), got {offsets.device}"
        )
    if N and reads_data(offsets):
        room = torch.tensor([cell[0] - tile, cell[1] - tile], device=offsets.device)
        bad = (offsets < 0) | (offsets > room)
        if bool(bad.any()):
            n, s, axis = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"{op}: offsets out of the cell: offsets[{n}, {s}] = {offsets[n, s].tolist()} but "
                f"a {tile}x{tile} tile in a {cell[0]}x{cell[1]} cell needs 0 <= dy <= {cell[0] - tile}"
                f" and 0 <= dx <= {cell[1] - tile}"
            )
    return offsets


# ---- the kernels or their references --------------------------------------------------------------


def _grid_tiles(images, index, table, grid, tile, offsets, offsets_by_cell, normalize):
    if has_kernel("grid_tiles", images.device.type):
        return torch.ops.labelkit.grid_tiles(
            images, index, table, grid, tile, offsets, offsets_by_cell, normalize
        )
    return grid_tiles_ref(images, index, table, grid, tile, offsets, offsets_by_cell, normalize)


def _rotate90(images, k):
    if has_kernel("rotate90", images.device.type):
        return torch.ops.labelkit.rotate90(images, k)
    return rotate90_ref(images, k)


# ---- public functions -----------------------------------------------------------------------------


def hamming_permutations(
    n: int,
    grid: int = 3,
    seed: int = 0,
    criterion: str = "max",
    *,
    num_candidates: int | None = None,
) -> torch.Tensor:
    """The jigsaw paper's permutation set: ``n`` permutations of the ``grid x grid`` cells that
    are far apart in Hamming distance, as a CPU ``[n, grid*grid]`` int64 tensor.

    The first permutation is drawn at random (from ``seed``); each next one is, among all
    candidates not yet chosen, the one whose minimum (``criterion='max'``, max-min: no pair
    closer than it must be) or mean (``'mean'``: the paper's Algorithm 1, which maximises the
    summed distance) Hamming distance to the chosen set is largest (ties: lexicographically
    first). For n=100, grid 3: min / mean pairwise distance 6 / 8.03 with 'max', 2 / 8.08 with
    'mean'.
    A running distance per candidate is updated with each pick, so the cost is
    ``O(n * M * grid^2)`` for ``M`` candidates: ``n=1000, grid=3`` takes a few seconds on a CPU.

    Candidates: all ``(grid^2)!`` permutations for grid 2 (24) and 3 (362,880). For grid >= 4
    that is too many (16! ~ 2e13), so ``num_candidates`` (default 100,000) distinct random
    permutations are drawn with the seed and the greedy choice runs over them. The candidate table
    (``num_candidates x grid^2``) is limited to ``MAX_TABLE_ENTRIES`` (2^27) entries: grid <= 36
    at the default 100,000 candidates.

    Deterministic for given arguments. :func:`hamming_distance_stats` reports the set's minimum
    and mean pairwise distance.
    """
    n, grid, seed, num_candidates = ints_where_possible(n, grid, seed, num_candidates)
    if not _is_int(grid) or grid < 2:
        raise ValueError(f"hamming_permutations: grid must be an int >= 2, got {grid!r}")
    if criterion not in _CRITERIA:
        raise ValueError(
            f"hamming_permutations: criterion must be one of {_CRITERIA}, got {criterion!r}"
        )
    if not _is_int(seed) or not -(2**63) <= seed < 2**64:
        raise ValueError(
            f"hamming_permutations: seed must be an int in [-2**63, 2**64) (torch.Generator's "
            f"range), got {seed!r}"
        )
    m = grid * grid
    enumerable = m <= _MAX_ENUMERATED_CELLS
    if num_candidates is None:
        num_candidates = math.factorial(m) if enumerable else DEFAULT_NUM_CANDIDATES
    elif not _is_int(num_candidates) or num_candidates < 1:
        raise ValueError(
            f"hamming_permutations: num_candidates must be an int >= 1 or None, got {num_candidates!r}"
        )
    if num_candidates * m > MAX_TABLE_ENTRIES:
        raise ValueError(
            f"hamming_permutations: grid={grid} with num_candidates={num_candidates} needs a "
            f"{num_candidates:,} x {m} candidate table, more than {MAX_TABLE_ENTRIES:,} entries; "
            "lower grid or num_candidates"
        )
    available = candidate_count(grid, num_candidates)
    if not _is_int(n) or not 1 <= n <= available:
        everything = enumerable and available == math.factorial(m)
        raise ValueError(
            f"hamming_permutations: n must be an int in [1, {available}] for grid={grid} "
            f"({'all' if everything else 'sampled'} candidate permutations), "
            f"got {n!r}"
        )
    return hamming_permutations_ref(n, grid, seed, criterion, num_candidates)


def candidate_count(grid: int, num_candidates: int | None = None) -> int:
    """How many permutations :func:`hamming_permutations` picks from for a ``grid x grid`` cut:
    every one of the (grid^2)! when there are at most ``num_candidates`` (grids 2 and 3 by
    default), else ``num_candidates`` distinct random ones (default 100,000)."""
    m = grid * grid
    if m > _MAX_ENUMERATED_CELLS:
        return DEFAULT_NUM_CANDIDATES if num_candidates is None else num_candidates
    total = math.factorial(m)
    return total if num_candidates is None else min(total, num_candidates)


def hamming_distance_stats(permutations: torch.Tensor) -> HammingStats:
    """Minimum and mean Hamming distance over all pairs of distinct rows of ``[P, m]``
    (P >= 2). Computed in row blocks, so P in the thousands is fine."""
    if not isinstance(permutations, torch.Tensor) or permutations.dim() != 2:
        raise ValueError("hamming_distance_stats: permutations must be a 2-D tensor [P, m]")
    P = permutations.shape[0]
    if P < 2:
        raise ValueError(f"hamming_distance_stats: need at least 2 permutations, got {P}")
    perms = permutations.cpu()
    lo, total = perms.shape[1], 0
    for start in range(0, P, 256):
        block = perms[start : start + 256]
        d = (block[:, None, :] != perms[None, :, :]).sum(-1)  # [b, P]
        own = torch.arange(start, start + block.shape[0])
        d[torch.arange(block.shape[0]), own] = perms.shape[1] + 1  # exclude self pairs
        lo = min(lo, int(d.min()))
        d[torch.arange(block.shape[0]), own] = 0
        total += int(d.sum())
    return HammingStats(lo, total / (P * (P - 1)))


def jigsaw_tiles(
    images: torch.Tensor,
    perm_index: torch.Tensor,
    permutations: torch.Tensor,
    grid: int = 3,
    tile_size: int | None = None,
    offsets: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Shuffled jigsaw tiles ``[N, grid*grid, C, t, t]``.

    Each image ``[C, H, W]`` is cut into ``grid x grid`` cells of ``H // grid x W // grid``
    pixels (row-major, from the top-left corner; remainder pixels are unused). A ``t x t`` tile
    is taken from each cell, at ``offsets[n, cell]`` = (dy, dx) inside the cell (jitter), or
    centred when ``offsets`` is None; ``t`` defaults to the largest that fits. Slot ``j`` holds
    cell ``permutations[perm_index[n], j]``, so ``tiles[n, inverse_perm]`` gives back the cells
    in order.

    Args:
        images: ``[N, C, H, W]`` float16/bfloat16/float32/float64/uint8, any strides
            (contiguous and channels-last run the fast paths).
        perm_index: ``[N]`` int64 in ``[0, P)`` on the images' device.
        permutations: ``[P, grid*grid]`` int64, each row a permutation of ``0..grid*grid-1``.
        grid: cells per side, >= 2.
        tile_size: ``t``; at most the cell's smaller side.
        offsets: ``[N, grid*grid, 2]`` int64, per cell, ``0 <= dy <= cell_h - t``,
            ``0 <= dx <= cell_w - t``.
        normalize: standardise each channel of each tile (mean 0, population std 1; a constant
            tile becomes 0), as the jigsaw paper does to block low-level shortcuts. uint8 tiles
            are then float32; float16/bfloat16 are computed in float32 and returned as given.

    Differentiable w.r.t. floating ``images``.
    """
    op = "jigsaw_tiles"
    images = _check_images(images, op)
    grid = _check_grid(grid, op, images)
    cell = cell_size(images.shape[-2], images.shape[-1], grid)
    tile = _check_tile(tile_size, "tile_size", op, cell)
    permutations = _check_permutations(permutations, op, grid, images.device)
    perm_index = _check_index(
        perm_index, "perm_index", op, images, permutations.shape[0], "rows of permutations"
    )
    offsets = _check_offsets(offsets, op, images, grid * grid, cell, tile, "grid*grid")
    return _grid_tiles(images, perm_index, permutations, grid, tile, offsets, True, bool(normalize))


def _check_context_grid(grid: object, op: str) -> None:
    grid = as_int(grid)
    if grid is None or grid < 3 or grid % 2 == 0:
        raise ValueError(
            f"{op}: grid must be an odd int >= 3 (the center cell has 8 neighbours), got {grid!r}"
        )


def _context_tiles(images, position, grid, patch_size, offsets, normalize, op):
    images = _check_images(images, op)
    _check_context_grid(grid, op)
    grid = _check_grid(grid, op, images)
    cell = cell_size(images.shape[-2], images.shape[-1], grid)
    patch = _check_tile(patch_size, "patch_size", op, cell)
    position = _check_index(position, "position", op, images, 8, "the 8 neighbours of the center")
    offsets = _check_offsets(offsets, op, images, 2, cell, patch, "2 (center, neighbour)")
    table = context_table(grid, images.device)
    return _grid_tiles(images, position, table, grid, patch, offsets, False, bool(normalize))


def context_pair(
    images: torch.Tensor,
    position: torch.Tensor,
    grid: int = 3,
    patch_size: int | None = None,
    offsets: torch.Tensor | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The relative-patch-location ("context") task's input: ``(center, neighbour)``, each
    ``[N, C, p, p]``.

    The image is cut into ``grid x grid`` cells as in :func:`jigsaw_tiles`; ``center`` is the
    ``p x p`` patch of the center cell and ``neighbour`` that of neighbour ``position[n]``
    (0..7: the 8 cells around the center, row-major, skipping it). ``offsets [N, 2, 2]`` int64
    jitter (center, neighbour) inside their cells; None centres both. ``p`` defaults to the
    largest that fits. ``grid`` must be odd (default 3). ``normalize`` as in jigsaw_tiles.
    """
    pair = _context_tiles(images, position, grid, patch_size, offsets, normalize, "context_pair")
    return pair[:, 0], pair[:, 1]


def rotate90(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each square image ``[N, C, S, S]`` by ``k[n]`` quarter turns (``k`` int64 in 0..3,
    counter-clockwise like ``torch.rot90(x, k, dims=(-2, -1))``) in one pass. Keeps the dtype and
    memory format (channels-last stays channels-last). Differentiable w.r.t. ``images``."""
    op = "rotate90"
    images = _check_images(images, op)
    H, W = images.shape[-2:]
    if H != W:
        raise ValueError(f"{op}: images must be square, got {H}x{W}")
    k = _check_index(k, "k", op, images, 4, "quarter turns")
    return _rotate90(images, k)


@functools.lru_cache(maxsize=8)
def _default_permutations(grid: int) -> torch.Tensor:
    return hamming_permutations(100 if grid > 2 else 24, grid)


def _random_offsets(N, slots, cell, tile, generator, device) -> torch.Tensor:
    """Uniform (dy, dx) in ``[0, cell - t]`` per slot, drawn on the generator's device."""
    room = torch.tensor([cell[0] - tile + 1, cell[1] - tile + 1], device=device)
    u = torch.rand((N, slots, 2), generator=generator, device=device)
    return (u * room).long().clamp_max(room - 1)


def make_pretext_batch(
    images: torch.Tensor,
    task: str,
    generator: torch.Generator | None = None,
    *,
    grid: int = 3,
    tile_size: int | None = None,
    permutations: torch.Tensor | None = None,
    jitter: bool = True,
    normalize: bool = False,
    all_rotations: bool = False,
) -> PretextBatch:
    """One labelled self-supervised batch from a batch of images, in one call, on the images'
    device, with no per-image Python.

    Tasks:
        ``'jigsaw'``: labels are random rows of ``permutations`` (default: the cached
            ``hamming_permutations(100, grid)``, all 24 for grid 2); inputs the shuffled tiles
            (:func:`jigsaw_tiles`, ``tile_size`` default: largest that fits).
        ``'context'``: labels are random neighbour positions 0..7; inputs ``[N, 2, C, p, p]``
            center and neighbour patches (:func:`context_pair`, ``tile_size`` is ``p``).
        ``'rotation'``: labels are random quarter turns 0..3; inputs the rotated images. With
            ``all_rotations=True`` every image appears four times (k = 0, 1, 2, 3, RotNet's
            recipe): inputs ``[4N, C, S, S]``, labels ``[0, 1, 2, 3] * N``.

    ``jitter`` draws each tile's offset inside its cell uniformly (only has room to move when
    ``tile_size`` is smaller than the cell, e.g. the jigsaw paper's 64 px tiles in 85 px cells
    of a 255 px image). All randomness comes from ``generator`` (any device; values are drawn
    there and moved to the images' device), so a seeded generator gives the same batch.
    """
    op = "make_pretext_batch"
    images = _check_images(images, op)
    if task not in PRETEXT_TASKS:
        raise ValueError(f"{op}: task must be one of {PRETEXT_TASKS}, got {task!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    N, device = images.shape[0], images.device
    rng_device = generator.device if generator is not None else device

    def draw(high: int) -> torch.Tensor:
        return torch.randint(high, (N,), generator=generator, device=rng_device).to(device)

    if task == "rotation":
        if all_rotations:
            k = torch.arange(4, device=device).repeat(N)
            return PretextBatch(rotate90(images.repeat_interleave(4, dim=0), k), k, 4)
        k = draw(4)
        return PretextBatch(rotate90(images, k), k, 4)

    if task == "context":
        _check_context_grid(grid, op)
    grid = _check_grid(grid, op, images)
    cell = cell_size(images.shape[-2], images.shape[-1], grid)
    tile = _check_tile(tile_size, "tile_size", op, cell)
    if task == "jigsaw":
        if permutations is None:
            permutations = _default_permutations(grid).to(device)
        table = _check_permutations(permutations, op, grid, device)
        offsets_by_cell = True
    else:
        table = context_table(grid, device)
        offsets_by_cell = False
    labels = draw(table.shape[0])
    offsets = None
    if jitter and N and min(cell) > tile:
        offsets = _random_offsets(N, table.shape[1], cell, tile, generator, rng_device).to(device)
    # labels and offsets are in range by construction: no further (syncing) checks needed.
    inputs = _grid_tiles(
        images, labels, table, grid, tile, offsets, offsets_by_cell, bool(normalize)
    )
    return PretextBatch(inputs, labels, table.shape[0])


# ---- torch.library registrations (only when the compiled ops exist) ------------------------------


def _op_defined(name: str) -> bool:
    """True when this ``_C`` defines ``labelkit::<name>`` (an older build may not)."""
    return HAS_OPS and f"labelkit::{name}" in torch._C._dispatch_get_all_op_names()


# ---- the fake kernels' checks: those of csrc/ops/pretext_checks.h that need no data, in its words.
# A meta tensor beside real ones dispatches to the fake kernel, which must not pass silently.

_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8)


def _fake_check_images(images: torch.Tensor, op: str) -> None:
    torch._check(
        images.dtype in _IMAGE_DTYPES,
        lambda: (
            f"{op}: images must be float16, bfloat16, float32, float64 or uint8, got {images.dtype}"
        ),
    )
    torch._check(
        images.dim() == 4,
        lambda: f"{op}: images must be 4-D [N, C, H, W], got shape {list(images.shape)}",
    )


def _fake_check_same_device(t: torch.Tensor, images: torch.Tensor, op: str, name: str) -> None:
    torch._check(
        t.device == images.device,
        lambda: f"{op}: {name} must be on the images' device ({images.device}), got {t.device}",
    )


def _fake_check_index(t: torch.Tensor, images: torch.Tensor, op: str, name: str) -> None:
    torch._check(t.dtype == torch.int64, lambda: f"{op}: {name} must be int64, got {t.dtype}")
    torch._check(
        t.dim() == 1 and t.shape[0] == images.shape[0],
        lambda: f"{op}: {name} must have shape [N] = [{images.shape[0]}], got {list(t.shape)}",
    )
    _fake_check_same_device(t, images, op, name)


def _fake_check_grid_tiles(images, index, table, grid, tile, offsets, offsets_by_cell, op) -> None:
    _fake_check_images(images, op)
    torch._check(grid >= 2, lambda: f"{op}: grid must be an int >= 2, got {grid}")
    H, W = images.shape[2], images.shape[3]
    torch._check(
        H >= grid and W >= grid,
        lambda: (
            f"{op}: images of size {H}x{W} are smaller than the grid ({grid}x{grid} cells "
            f"need at least {grid} pixels per side)"
        ),
    )
    torch._check(tile >= 1, lambda: f"{op}: tile must be >= 1, got {tile}")
    torch._check(
        tile <= min(H // grid, W // grid),
        lambda: (
            f"{op}: tile={tile} is larger than a cell ({H // grid}x{W // grid} pixels); at most "
            f"{min(H // grid, W // grid)}"
        ),
    )
    _fake_check_index(index, images, op, "index")
    torch._check(
        table.dtype == torch.int64, lambda: f"{op}: table must be int64, got {table.dtype}"
    )
    torch._check(
        table.dim() == 2 and table.shape[0] >= 1 and table.shape[1] >= 1,
        lambda: f"{op}: table must have shape [P >= 1, K >= 1], got {list(table.shape)}",
    )
    _fake_check_same_device(table, images, op, "table")
    if offsets is None:
        return
    slots = grid * grid if offsets_by_cell else table.shape[1]
    torch._check(
        offsets.dtype == torch.int64, lambda: f"{op}: offsets must be int64, got {offsets.dtype}"
    )
    torch._check(
        offsets.dim() == 3 and tuple(offsets.shape) == (images.shape[0], slots, 2),
        lambda: (
            f"{op}: offsets must have shape [N, {slots}, 2] = [{images.shape[0]}, {slots}, 2], "
            f"got {list(offsets.shape)}"
        ),
    )
    _fake_check_same_device(offsets, images, op, "offsets")


def _register_fake_kernels() -> None:
    @torch.library.register_fake("labelkit::grid_tiles")
    def _grid_tiles_fake(images, index, table, grid, tile, offsets, offsets_by_cell, normalize):
        _fake_check_grid_tiles(
            images, index, table, grid, tile, offsets, offsets_by_cell, "grid_tiles"
        )
        N, C = images.shape[:2]
        return images.new_empty(
            (N, table.shape[1], C, tile, tile), dtype=tile_dtype(images.dtype, normalize)
        )

    @torch.library.register_fake("labelkit::_grid_tiles_backward")
    def _grid_tiles_backward_fake(
        grad, images, index, table, grid, tile, offsets, offsets_by_cell, normalize
    ):
        op = "_grid_tiles_backward"
        _fake_check_grid_tiles(images, index, table, grid, tile, offsets, offsets_by_cell, op)
        torch._check(
            images.is_floating_point(),
            lambda: f"{op}: gradients need floating-point images, got {images.dtype}",
        )
        want = [images.shape[0], table.shape[1], images.shape[1], tile, tile]
        torch._check(
            list(grad.shape) == want and grad.dtype == images.dtype,
            lambda: (
                f"{op}: grad must be {want} of the images' dtype {images.dtype}, got "
                f"{list(grad.shape)} {grad.dtype}"
            ),
        )
        _fake_check_same_device(grad, images, op, "grad")
        return torch.empty_like(images)

    @torch.library.register_fake("labelkit::rotate90")
    def _rotate90_fake(images, k):
        _fake_check_images(images, "rotate90")
        torch._check(
            images.shape[2] == images.shape[3],
            lambda: f"rotate90: images must be square, got {images.shape[2]}x{images.shape[3]}",
        )
        _fake_check_index(k, images, "rotate90", "k")
        return torch.empty_like(images)


def _grid_tiles_setup(ctx, inputs, output):
    images, index, table, grid, tile, offsets, offsets_by_cell, normalize = inputs
    ctx.args = (grid, tile, offsets_by_cell, normalize)
    ctx.save_for_backward(images, index, table, offsets)


def _grid_tiles_backward(ctx, grad):
    images, index, table, offsets = ctx.saved_tensors
    grid, tile, offsets_by_cell, normalize = ctx.args
    grad_images = torch.ops.labelkit._grid_tiles_backward(
        grad.contiguous(), images, index, table, grid, tile, offsets, offsets_by_cell, normalize
    )
    return grad_images, None, None, None, None, None, None, None


def _grid_tiles_backward_setup(ctx, inputs, output):
    _grad, _images, index, table, grid, tile, offsets, offsets_by_cell, normalize = inputs
    ctx.args = (grid, tile, offsets_by_cell, normalize)
    ctx.save_for_backward(index, table, offsets)


_tiles_twice = no_double_backward(
    "jigsaw_tiles/context_pair with normalize=True", "labelkit_ext.reference.pretext"
)


def _grid_tiles_double_backward(ctx, grad_grad_images):
    """Without normalize the tiles are a gather, so their backward (a scatter of ``grad``) is
    linear in ``grad`` and does not depend on the images: its own derivative is the gather of
    ``grad_grad_images``. Standardised tiles are nonlinear: a clear error."""
    grid, tile, offsets_by_cell, normalize = ctx.args
    if normalize:
        _tiles_twice(ctx, grad_grad_images)
    index, table, offsets = ctx.saved_tensors
    grad_grad = torch.ops.labelkit.grid_tiles(
        grad_grad_images, index, table, grid, tile, offsets, offsets_by_cell, False
    )
    return (grad_grad,) + (None,) * 8


def _rotate90_setup(ctx, inputs, output):
    _images, k = inputs
    ctx.save_for_backward(k)


def _rotate90_backward(ctx, grad):
    (k,) = ctx.saved_tensors
    return torch.ops.labelkit.rotate90(grad, torch.remainder(4 - k, 4)), None


def _register_autograd() -> None:
    torch.library.register_autograd(
        "labelkit::grid_tiles", _grid_tiles_backward, setup_context=_grid_tiles_setup
    )
    torch.library.register_autograd(
        "labelkit::_grid_tiles_backward",
        _grid_tiles_double_backward,
        setup_context=_grid_tiles_backward_setup,
    )
    torch.library.register_autograd(
        "labelkit::rotate90", _rotate90_backward, setup_context=_rotate90_setup
    )


if _op_defined("grid_tiles") and _op_defined("rotate90"):
    _register_fake_kernels()
    _register_autograd()
