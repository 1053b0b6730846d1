"""Reference implementations of the pretext-task op family in plain, vectorised PyTorch.

Every tile op is one gather, :func:`grid_tiles_ref`: the image is cut into ``grid x grid`` cells
(row-major, each ``H // grid`` by ``W // grid`` pixels from the top-left corner; remainder rows
and columns at the bottom/right are never read), and slot ``k`` of sample ``n`` is the ``t x t``
tile of cell ``table[index[n], k]`` whose top-left corner sits at ``(dy, dx)`` inside that cell.
Jigsaw uses a permutation table; the context pair uses a table of ``(center, neighbour)`` rows.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "cell_size",
    "context_table",
    "grid_tiles_ref",
    "hamming_permutations_ref",
    "jigsaw_tiles_ref",
    "context_pair_ref",
    "rotate90_ref",
    "tile_dtype",
]


def cell_size(height: int, width: int, grid: int) -> tuple[int, int]:
    """Height and width of one cell of a ``grid x grid`` cut of an ``height x width`` image."""
    return height // grid, width // grid


def tile_dtype(dtype: torch.dtype, normalize: bool) -> torch.dtype:
    """Output dtype of a tile op: the input's, except normalised uint8 tiles are float32."""
    return torch.float32 if normalize and not dtype.is_floating_point else dtype


def context_table(grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[8, 2]`` rows ``(center cell, neighbour cell)``: the 8 cells around the center of an odd
    ``grid``, row-major, skipping the center. Row ``p`` is the context task's class ``p``."""
    c = grid // 2
    center = c * grid + c
    rows = [
        (center, (c + dr) * grid + (c + dc))
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if (dr, dc) != (0, 0)
    ]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _tile_scale(acc: torch.Tensor) -> torch.Tensor:
    """The power of two each tile's statistics are taken at (csrc/ops/pretext.h tile_scale): 1
    when its largest |pixel| is in [2^-32, 2^32], zero or non-finite; else 2^-e with
    ``amax = m * 2^e`` (0.5 <= m < 1), e clamped so the factor stays a normal number."""
    amax = acc.detach().abs().amax(dim=(-2, -1), keepdim=True)
    limit = 1022 if acc.dtype == torch.float64 else 126
    shift = (-torch.frexp(amax).exponent).clamp(-limit, limit)
    scale = torch.exp2(shift.to(torch.float64)).to(acc.dtype)  # exact: an integer power of two
    moderate = (amax >= 2.0**-32) & (amax <= 2.0**32)
    unusable = ~torch.isfinite(amax) | (amax == 0)
    return torch.where(moderate | unusable, torch.ones_like(scale), scale)


def _normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Standardise each channel of each tile ``[..., t, t]`` with the population std.

    A constant tile (min == max) becomes 0 with gradient 0; NaN propagates. Statistics are taken
    of the tile times a power of two (:func:`_tile_scale`) so that extreme pixels neither
    overflow nor underflow them. Same policy as csrc/ops/pretext.h.
    """
    acc = tiles.to(torch.float64 if tiles.dtype == torch.float64 else torch.float32)
    if acc.numel() == 0:  # var_mean of nothing warns (no degrees of freedom)
        return acc
    flat = acc.flatten(-2)
    lo, hi = torch.aminmax(flat.detach(), dim=-1, keepdim=True)
    constant = (lo == hi).unsqueeze(-1)
    # A constant tile's statistics are never used: zeros stand in for its pixels, so that an
    # all-inf tile's (inf - inf) cannot send NaN back through where()'s unused branch.
    acc = torch.where(constant, torch.zeros_like(acc), acc)
    acc = acc * _tile_scale(acc)
    var, mean = torch.var_mean(acc, dim=(-2, -1), keepdim=True, correction=0)
    # where() before sqrt: a zero variance must not reach sqrt's backward (0/0); NaN stays NaN.
    std = torch.where(var == 0, torch.ones_like(var), var).sqrt()
    return torch.where(constant, torch.zeros_like(acc), (acc - mean) / std)


def grid_tiles_ref(
    images: torch.Tensor,
    index: torch.Tensor,
    table: torch.Tensor,
    grid: int,
    tile: int,
    offsets: torch.Tensor | None,
    offsets_by_cell: bool,
    normalize: bool,
) -> torch.Tensor:
    """``[N, K, C, t, t]`` tiles: slot ``k`` of sample ``n`` is cell ``table[index[n], k]``.

    ``offsets`` ``[N, *, 2]`` (dy, dx) are indexed by cell when ``offsets_by_cell`` else by slot;
    None centres each tile in its cell. Differentiable w.r.t. ``images`` (a gather).
    """
    N, C, H, W = images.shape
    ch, cw = cell_size(H, W, grid)
    cells = table.index_select(0, index)  # [N, K]
    K = cells.shape[1]
    if offsets is None:
        dy = torch.full_like(cells, (ch - tile) // 2)
        dx = torch.full_like(cells, (cw - tile) // 2)
    else:
        off = offsets.gather(1, cells.unsqueeze(-1).expand(N, K, 2)) if offsets_by_cell else offsets
        dy, dx = off[..., 0], off[..., 1]
    top = torch.div(cells, grid, rounding_mode="floor") * ch + dy  # [N, K]
    left = torch.remainder(cells, grid) * cw + dx
    r = torch.arange(tile, device=images.device)
    rows = (top.unsqueeze(-1) + r)[:, :, :, None]  # [N, K, t, 1]
    cols = (left.unsqueeze(-1) + r)[:, :, None, :]  # [N, K, 1, t]
    n = torch.arange(N, device=images.device)[:, None, None, None]
    # Advanced indices around a slice put the indexed dims first: [N, K, t, t, C].
    tiles = images[n, :, rows, cols].permute(0, 1, 4, 2, 3)
    if normalize:
        return _normalize_tiles(tiles).to(tile_dtype(images.dtype, True)).contiguous()
    return tiles.contiguous()


def jigsaw_tiles_ref(
    images: torch.Tensor,
    perm_index: torch.Tensor,
    permutations: torch.Tensor,
    grid: int,
    tile: int,
    offsets: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    """See :func:`labelkit_ext.jigsaw_tiles`; offsets are per cell."""
    return grid_tiles_ref(images, perm_index, permutations, grid, tile, offsets, True, normalize)


def context_pair_ref(
    images: torch.Tensor,
    position: torch.Tensor,
    grid: int,
    patch: int,
    offsets: torch.Tensor | None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`labelkit_ext.context_pair`; offsets ``[N, 2, 2]`` are (center, neighbour)."""
    table = context_table(grid, images.device)
    pair = grid_tiles_ref(images, position, table, grid, patch, offsets, False, normalize)
    return pair[:, 0], pair[:, 1]


def _rotation_sources(size: int, device: torch.device) -> torch.Tensor:
    """``[4, size*size]`` flat source pixel of each output pixel for k = 0..3 quarter turns,
    matching ``torch.rot90(x, k, dims=(-2, -1))`` (counter-clockwise)."""
    i = torch.arange(size, device=device)[:, None].expand(size, size)
    j = torch.arange(size, device=device)[None, :].expand(size, size)
    last = size - 1
    src = torch.stack(
        [i * size + j, j * size + (last - i), (last - i) * size + (last - j), (last - j) * size + i]
    )
    return src.reshape(4, size * size)


def rotate90_ref(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate square image ``n`` by ``k[n]`` quarter turns (counter-clockwise, as torch.rot90),
    as one gather; keeps the input's memory format."""
    N, C, H, W = images.shape
    src = _rotation_sources(H, images.device).index_select(0, k)  # [N, H*W]
    flat = images.reshape(N, C, H * W)
    out = flat.gather(2, src.unsqueeze(1).expand(N, C, H * W)).reshape(N, C, H, W)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


# ---- Hamming-distance permutation sets --------------------------------------------------------


def all_permutations(m: int) -> torch.Tensor:
    """All ``m!`` permutations of ``0..m-1`` in lexicographic order, ``[m!, m]`` uint8.

    Built recursively: the block starting with ``v`` is ``v`` followed by the permutations of
    ``m - 1`` relabelled onto the other values, which keeps lexicographic order. m table
    lookups per level, no Python loop per row.
    """
    perms = torch.zeros(1, 0, dtype=torch.uint8)
    for size in range(1, m + 1):
        blocks = []
        for v in range(size):
            others = torch.tensor([u for u in range(size) if u != v], dtype=torch.uint8)
            head = torch.full((perms.shape[0], 1), v, dtype=torch.uint8)
            blocks.append(torch.cat([head, others[perms.long()]], dim=1))
        perms = torch.cat(blocks)
    return perms


def cell_dtype(m: int) -> torch.dtype:
    """The smallest integer dtype that holds cell numbers ``0..m-1`` and counts ``0..m``:
    uint8 up to grid 15 (m <= 255), then int16 (up to grid 181), then int32."""
    return torch.uint8 if m < 2**8 else torch.int16 if m < 2**15 else torch.int32


def sampled_permutations(m: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` (< m!) distinct random permutations of ``0..m-1`` (``[count, m]``
    :func:`cell_dtype`): the first ``count`` distinct ones drawn with ``generator`` (more are
    drawn while repeats leave fewer), sorted lexicographically, so deterministic for a seed."""
    dtype = cell_dtype(m)
    perms = torch.empty(0, m, dtype=dtype)
    while True:
        keys = torch.rand(count, m, generator=generator)
        perms = torch.cat([perms, keys.argsort(dim=1).to(dtype)])
        rows, inverse = torch.unique(perms, dim=0, return_inverse=True)
        if rows.shape[0] >= count:
            break
    # the draw position of each distinct row's first occurrence; keep the earliest count
    first = torch.full((rows.shape[0],), perms.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(perms.shape[0]), reduce="amin")
    return rows[first.argsort()[:count].sort().values]


# Largest [m, m, M] match table greedy_hamming_select builds (bytes at uint8): grid 3's 362,880
# candidates take 29 MB, grid 4's default 100,000 take 26 MB; bigger sets compare column by column.
EQ_TABLE_ENTRIES = 2**27


def match_counter(candidates: torch.Tensor):
    """A function of one row's cell values that returns, for every candidate row of
    ``candidates [M, m]``, how many positions hold the same value (``[M]``, :func:`cell_dtype`;
    the returned tensor is reused by the next call).

    Small sets precompute ``eq[pos, value] = candidates[:, pos] == value`` so that a count is
    ``m`` contiguous adds; larger ones (``m * m * M > EQ_TABLE_ENTRIES``) compare each position's
    column instead: twice the work, memory ``O(M * m)`` instead of ``O(M * m^2)``.
    """
    M, m = candidates.shape
    dtype = cell_dtype(m)
    columns = candidates.t().contiguous()
    matches = torch.empty(M, dtype=dtype)
    if m * m * M <= EQ_TABLE_ENTRIES:
        values = torch.arange(m, dtype=candidates.dtype)[:, None]
        eq = torch.empty(m, m, M, dtype=dtype)
        for pos in range(m):
            eq[pos] = columns[pos] == values

        def count(row: list[int]) -> torch.Tensor:
            torch.add(eq[0, row[0]], eq[1, row[1]], out=matches)  # m >= 4 here (grid >= 2)
            for pos in range(2, m):
                matches.add_(eq[pos, row[pos]])
            return matches

        return count

    def count_by_column(row: list[int]) -> torch.Tensor:
        same = columns == torch.tensor(row, dtype=columns.dtype)[:, None]  # [m, M]
        return torch.sum(same, dim=0, dtype=dtype, out=matches)

    return count_by_column


def greedy_hamming_select(
    candidates: torch.Tensor, n: int, first: int, criterion: str
) -> torch.Tensor:
    """Greedy max-min ('max') or max-mean ('mean') Hamming selection of ``n`` rows of
    ``candidates [M, m]`` (:func:`cell_dtype`), starting with row ``first``. Returns the chosen
    row indices.

    A running distance per candidate (minimum or sum over the chosen set) is updated with the
    newly chosen row only (:func:`match_counter`): O(n * M * m) instead of recomputing the table
    every step. Ties go to the lowest row index.
    """
    M, m = candidates.shape
    count_matches = match_counter(candidates)
    # 'max' keeps the running minimum in cell_dtype (distances are <= m); a chosen row is at
    # distance 0 from itself and every other row at >= 2, so chosen rows never win again.
    # 'mean' keeps an int32 sum (<= n * m <= 2^27) and masks the chosen rows.
    by_min = criterion == "max"
    running = (
        torch.full((M,), m, dtype=cell_dtype(m)) if by_min else torch.zeros(M, dtype=torch.int32)
    )
    taken = torch.zeros(M, dtype=torch.bool)
    chosen = torch.empty(n, dtype=torch.int64)
    pick = first
    for step in range(n):
        chosen[step] = pick
        taken[pick] = True
        distance = m - count_matches(candidates[pick].tolist())
        if by_min:
            torch.minimum(running, distance, out=running)
        else:
            running += distance
        if step + 1 < n:
            score = running if by_min else running.masked_fill(taken, -1)
            pick = int(score.argmax())
    return chosen


def hamming_permutations_ref(
    n: int, grid: int, seed: int, criterion: str, num_candidates: int
) -> torch.Tensor:
    """See :func:`labelkit_ext.hamming_permutations` (arguments already validated)."""
    m = grid * grid
    generator = torch.Generator().manual_seed(seed)
    if math.factorial(m) <= num_candidates:
        candidates = all_permutations(m)
    else:
        candidates = sampled_permutations(m, num_candidates, generator)
    first = int(torch.randint(candidates.shape[0], (1,), generator=generator))
    chosen = greedy_hamming_select(candidates, n, first, criterion)
    return candidates.index_select(0, chosen).long()
