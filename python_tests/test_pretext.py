"""The test battery of ENGINEERING.md for the pretext-task ops: hamming_permutations,
jigsaw_tiles, context_pair, rotate90 and make_pretext_batch."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, requires_ops
from hypothesis import given, settings
from hypothesis import strategies as st

from labelkit_ext import (
    PretextBatch,
    _ext,
    context_pair,
    hamming_distance_stats,
    hamming_permutations,
    jigsaw_tiles,
    make_pretext_batch,
    rotate90,
)
from labelkit_ext.reference import pretext as pretext_ref
from labelkit_ext.reference.pretext import (
    all_permutations,
    context_pair_ref,
    jigsaw_tiles_ref,
    rotate90_ref,
)

IMAGE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]


# ---- independent oracles: slow per-image NumPy loops ---------------------------------------------


def _standardise(tile: np.ndarray) -> np.ndarray:
    out = np.empty_like(tile, dtype=np.float64)
    for c, plane in enumerate(tile.astype(np.float64)):
        if plane.min() == plane.max():
            out[c] = 0.0
        else:
            out[c] = (plane - plane.mean()) / plane.std()
    return out


def tile_oracle(
    img: np.ndarray, cell: int, grid: int, t: int, offset, normalize: bool
) -> np.ndarray:
    """One ``[C, t, t]`` tile of ``img [C, H, W]``, by the textbook geometry."""
    ch, cw = img.shape[1] // grid, img.shape[2] // grid
    r, c = divmod(cell, grid)
    dy, dx = offset if offset is not None else ((ch - t) // 2, (cw - t) // 2)
    tile = img[:, r * ch + dy : r * ch + dy + t, c * cw + dx : c * cw + dx + t].astype(np.float64)
    return _standardise(tile) if normalize else tile


def jigsaw_oracle(images, perm_index, permutations, grid, t, offsets, normalize) -> np.ndarray:
    out = []
    for n, img in enumerate(images.double().numpy()):
        perm = permutations[int(perm_index[n])].tolist()
        row = []
        for cell in perm:
            off = None if offsets is None else offsets[n, cell].tolist()
            row.append(tile_oracle(img, cell, grid, t, off, normalize))
        out.append(np.stack(row))
    return np.stack(out) if out else np.zeros((0,))


def neighbour_cells(grid: int) -> list[int]:
    c = grid // 2
    return [r * grid + q for r in (c - 1, c, c + 1) for q in (c - 1, c, c + 1) if (r, q) != (c, c)]


def context_oracle(images, position, grid, p, offsets, normalize=False):
    centres, neighbours = [], []
    centre = (grid // 2) * grid + grid // 2
    for n, img in enumerate(images.double().numpy()):
        oc = None if offsets is None else offsets[n, 0].tolist()
        on = None if offsets is None else offsets[n, 1].tolist()
        centres.append(tile_oracle(img, centre, grid, p, oc, normalize))
        neighbours.append(
            tile_oracle(img, neighbour_cells(grid)[int(position[n])], grid, p, on, normalize)
        )
    return np.stack(centres), np.stack(neighbours)


def rotate_oracle(images, k) -> np.ndarray:
    return np.stack(
        [
            np.rot90(img, int(kn), axes=(1, 2))
            for img, kn in zip(images.double().numpy(), k, strict=True)
        ]
    )


def hamming_oracle(
    n: int, grid: int, seed: int, criterion: str, num_candidates: int | None = None
) -> list[tuple[int, ...]]:
    """The O(n^2 * M) greedy of the jigsaw paper's code: recompute every distance each step.
    Candidates: every permutation, or ``num_candidates`` sampled as the op samples them."""
    m = grid * grid
    generator = torch.Generator().manual_seed(seed)
    if num_candidates is None:
        cands = np.array(list(itertools.permutations(range(m))))
    else:
        cands = pretext_ref.sampled_permutations(m, num_candidates, generator).long().numpy()
    chosen = [int(torch.randint(len(cands), (1,), generator=generator))]
    while len(chosen) < n:
        dist = (cands[:, None, :] != cands[chosen][None, :, :]).sum(-1)  # [M, j]
        score = dist.min(1) if criterion == "max" else dist.mean(1)
        score = score.astype(np.float64)
        score[chosen] = -1
        chosen.append(int(np.argmax(score)))
    return [tuple(int(v) for v in cands[i]) for i in chosen]


# ---- helpers --------------------------------------------------------------------------------------


def make_images(
    shape, dtype=torch.float32, device="cpu", seed=0, layout="contiguous"
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x * 255).round() if dtype == torch.uint8 else x * 4 - 2
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider image
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    return x


def random_perms(P: int, m: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(m, generator=g) for _ in range(P)]).to(device)


def random_offsets(N, slots, room_h, room_w, seed=0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(room_h + 1, (N, slots, 1), generator=g)
    dx = torch.randint(room_w + 1, (N, slots, 1), generator=g)
    return torch.cat([dy, dx], -1).to(device)


def compare(actual: torch.Tensor, expected, normalize: bool):
    """Gathers are exact; standardised tiles compare at the tolerance of their float dtype."""
    expected = (
        torch.as_tensor(np.asarray(expected))
        if not isinstance(expected, torch.Tensor)
        else expected
    )
    if not normalize:
        torch.testing.assert_close(
            actual.double(), expected.double(), rtol=0, atol=0, equal_nan=True
        )
    else:
        assert_close(actual, expected.to(actual.device), dtype=actual.dtype)


# ---- 2. reference vs the oracles ---------------------------------------------------------------


@pytest.mark.parametrize("grid", [2, 3, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_jigsaw_reference_matches_oracle(grid, normalize):
    x = make_images((3, 2, 4 * grid + 1, 3 * grid + 2), torch.float64, seed=grid)
    perms = random_perms(5, grid * grid, seed=grid)
    pidx = torch.tensor([4, 0, 2])
    t = 2
    off = random_offsets(3, grid * grid, 4 - t, 3 - t, seed=1)
    for offsets in (None, off):
        got = jigsaw_tiles_ref(x, pidx, perms, grid, t, offsets, normalize)
        want = jigsaw_oracle(x, pidx, perms, grid, t, offsets, normalize)
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-12, atol=1e-12)


def test_context_and_rotation_references_match_oracles():
    x = make_images((8, 3, 15, 15), torch.float64)
    pos = torch.arange(8)
    off = random_offsets(8, 2, 2, 2, seed=3)
    for grid in (3, 5):
        p = 15 // grid - 2 if grid == 3 else 1
        offsets = off.clamp_max(15 // grid - p)
        c, nb = context_pair_ref(x, pos, grid, p, offsets)
        oc, onb = context_oracle(x, pos, grid, p, offsets)
        torch.testing.assert_close(c, torch.from_numpy(oc))
        torch.testing.assert_close(nb, torch.from_numpy(onb))
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    torch.testing.assert_close(rotate90_ref(x, k), torch.from_numpy(rotate_oracle(x, k).copy()))


def test_all_permutations_is_itertools_order():
    for m in (1, 2, 3, 4, 5):
        want = torch.tensor(list(itertools.permutations(range(m))), dtype=torch.uint8)
        assert torch.equal(all_permutations(m), want)
    assert all_permutations(9).shape == (math.factorial(9), 9)


# ---- hamming_permutations ----------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["max", "mean"])
def test_hamming_matches_quadratic_oracle(criterion):
    for n in (1, 2, 7, 24):
        got = hamming_permutations(n, grid=2, seed=5, criterion=criterion)
        assert [tuple(r) for r in got.tolist()] == hamming_oracle(n, 2, 5, criterion)
    got = hamming_permutations(6, grid=3, seed=1, criterion=criterion)
    assert [tuple(r) for r in got.tolist()] == hamming_oracle(6, 3, 1, criterion)


def test_hamming_set_properties():
    perms = hamming_permutations(100)  # each set costs ~0.3 s on an idle core: keep calls few
    assert perms.dtype == torch.int64 and perms.shape == (100, 9)
    assert torch.equal(perms.sort(1).values, torch.arange(9).expand(100, 9))
    assert torch.unique(perms, dim=0).shape[0] == 100
    assert torch.equal(perms[:20], hamming_permutations(20))  # deterministic, greedy prefix
    assert not torch.equal(perms[:20], hamming_permutations(20, seed=1))
    stats = hamming_distance_stats(perms)
    # The max-min greedy keeps every pair far apart; the mean criterion spreads the average.
    assert stats.min_distance >= 6
    assert stats.mean_distance > 8.0
    mean_set = hamming_permutations(100, criterion="mean")
    assert hamming_distance_stats(mean_set).mean_distance >= stats.mean_distance - 0.05


def test_hamming_grid4_samples_candidates():
    perms = hamming_permutations(30, grid=4, seed=2, num_candidates=5000)
    assert perms.shape == (30, 16)
    assert torch.equal(perms.sort(1).values, torch.arange(16).expand(30, 16))
    assert torch.unique(perms, dim=0).shape[0] == 30
    assert torch.equal(perms, hamming_permutations(30, grid=4, seed=2, num_candidates=5000))
    assert hamming_distance_stats(perms).min_distance >= 13


@pytest.mark.parametrize("criterion", ["max", "mean"])
@pytest.mark.parametrize("grid", [15, 16, 17])
def test_hamming_large_grids(grid, criterion, monkeypatch):
    """Past uint8's range: grid 16's 256 cells count distances up to 256, grid 17 numbers cells
    up to 288. Rows stay permutations, 'max' stays max-min, and the column-by-column count
    (large candidate sets) picks what the match table does."""
    m = grid * grid
    perms = hamming_permutations(8, grid=grid, seed=3, criterion=criterion, num_candidates=40)
    assert torch.equal(perms.sort(1).values, torch.arange(m).expand(8, m))
    assert [tuple(r) for r in perms.tolist()] == hamming_oracle(8, grid, 3, criterion, 40)
    monkeypatch.setattr(pretext_ref, "EQ_TABLE_ENTRIES", 0)
    by_column = hamming_permutations(8, grid=grid, seed=3, criterion=criterion, num_candidates=40)
    assert torch.equal(by_column, perms)


def test_hamming_memory_stays_linear_in_the_candidate_table():
    """A 20 x 20 grid with 1,000 candidates is a 400,000-entry table; the old [m, m, M] match
    table made it 160 MB (321 MiB at peak). A fresh interpreter measures the peak's growth."""
    code = (
        "import resource, torch, labelkit_ext\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "labelkit_ext.hamming_permutations(3, grid=20, num_candidates=1000)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 40 * 1024, out.stdout  # KiB


def test_hamming_distance_stats_brute_force():
    perms = random_perms(40, 9, seed=4)
    d = [int((perms[i] != perms[j]).sum()) for i in range(40) for j in range(40) if i != j]
    stats = hamming_distance_stats(perms)
    assert stats.min_distance == min(d)
    assert stats.mean_distance == pytest.approx(sum(d) / len(d))


def test_hamming_errors():
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 24\]"):
        hamming_permutations(25, grid=2)
    with pytest.raises(ValueError, match="n must be an int"):
        hamming_permutations(0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        hamming_permutations(5, criterion="min")
    with pytest.raises(ValueError, match="grid must be an int >= 2"):
        hamming_permutations(5, grid=1)
    with pytest.raises(ValueError, match="num_candidates"):
        hamming_permutations(5, grid=4, num_candidates=0)
    # Huge grids: refused at once, before any table (or 10^6 factorial) is built.
    for grid in (37, 1000):
        with pytest.raises(ValueError, match=rf"grid={grid} with num_candidates=100000 needs a"):
            hamming_permutations(2, grid=grid)
    with pytest.raises(ValueError, match="candidate table, more than 134,217,728 entries"):
        hamming_permutations(2, grid=4, num_candidates=2**24)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        hamming_permutations(2, seed=2**70)
    with pytest.raises(ValueError, match="at least 2 permutations"):
        hamming_distance_stats(torch.arange(9)[None])


# ---- 1. forward: kernel vs reference over dtypes and layouts ------------------------------------


@pytest.mark.parametrize("dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("normalize", [False, True])
def test_jigsaw_forward(device, dtype, layout, normalize):
    x = make_images((6, 3, 31, 29), dtype, device, layout=layout)
    perms = hamming_permutations(10).to(device)
    pidx = torch.tensor([0, 9, 3, 3, 7, 1], device=device)
    off = random_offsets(6, 9, 10 - 6, 9 - 6, device=device)
    for offsets in (None, off):
        got = jigsaw_tiles(x, pidx, perms, 3, 6, offsets, normalize)
        want = jigsaw_tiles_ref(x, pidx, perms, 3, 6, offsets, normalize)
        assert (
            got.dtype
            == want.dtype
            == (torch.float32 if normalize and dtype == torch.uint8 else dtype)
        )
        assert got.shape == (6, 9, 3, 6, 6) and got.is_contiguous()
        compare(got, want, normalize)


@pytest.mark.parametrize("dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_context_and_rotate_forward(device, dtype, layout):
    x = make_images((8, 3, 17, 17), dtype, device, layout=layout)
    pos = torch.randperm(8, generator=torch.Generator().manual_seed(0)).to(device)
    off = random_offsets(8, 2, 1, 1, device=device)
    for offsets in (None, off):
        c, nb = context_pair(x, pos, 3, 4, offsets)
        rc, rnb = context_pair_ref(x, pos, 3, 4, offsets)
        compare(c, rc, False)
        compare(nb, rnb, False)
    k = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0], device=device)
    r = rotate90(x, k)
    compare(r, rotate90_ref(x, k), False)
    for n in range(8):
        assert torch.equal(r[n], torch.rot90(x[n], int(k[n]), dims=(-2, -1)))
    if layout == "channels_last":
        assert r.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("size", [1, 4, 7, 8, 9, 16, 32, 33, 65])
def test_rotate90_every_turn_at_tile_edges(device, dtype, size):
    """Sizes around the CPU kernel's 8 x 8 transpose blocks and the CUDA kernel's 32 x 32 tiles
    (whole tiles, partial edge tiles, none)."""
    x = make_images((4, 2, size, size), dtype, device)
    k = torch.arange(4, device=device)
    r = rotate90(x, k)
    for n in range(4):
        assert torch.equal(r[n], torch.rot90(x[n], n, dims=(-2, -1))), f"k={n}"


@pytest.mark.parametrize(
    ("n", "c", "size", "tile"),
    [(3, 3, 3, 1), (4, 3, 15, 5), (2, 3, 61, 20), (2, 3, 120, 40), (4000, 1, 3, 1)],
)
def test_jigsaw_tile_sizes_and_many_tiles(device, n, c, size, tile):
    """Tiles of 3 to 4,800 elements (the CUDA copy's thread groups of 32 to 256, whose steps carry
    across rows and channels) and more tiles than one CUDA grid holds (4,000 x 9: the grid-stride
    loop wraps on any GPU, and at every size on the emulated one)."""
    x = make_images((n, c, size, size), torch.float32, device)
    perms = hamming_permutations(10).to(device)
    pidx = torch.arange(n, device=device) % 10
    assert torch.equal(
        jigsaw_tiles(x, pidx, perms, 3, tile),
        jigsaw_tiles_ref(x, pidx, perms, 3, tile, None, False),
    )


def test_jigsaw_tiles_of_an_image_spanning_over_2_31_elements(device):
    """A channel stride of 2^31 elements: the CUDA copy forms 64-bit offsets (int32 ones only when
    every offset inside an image fits). Only the 2 x 6 x 6 elements viewed are ever touched."""
    base = torch.empty(2**31 + 64, dtype=torch.uint8, device=device)
    x = base.as_strided((1, 2, 6, 6), (0, 2**31, 6, 1))
    x.copy_(torch.randint(0, 256, (1, 2, 6, 6), dtype=torch.uint8))
    perms = hamming_permutations(4).to(device)
    pidx = torch.tensor([3], device=device)
    got = jigsaw_tiles(x, pidx, perms, 3, 2)
    assert torch.equal(got, jigsaw_tiles_ref(x.contiguous(), pidx, perms, 3, 2, None, False))


def test_rotate90_more_tiles_than_one_cuda_grid(device):
    """5,000 planes: more 32 x 32 tiles than the CUDA grid's blocks, so they loop."""
    x = make_images((5000, 1, 2, 2), torch.float32, device)
    k = torch.arange(5000, device=device) % 4
    assert torch.equal(rotate90(x, k), rotate90_ref(x, k))


def test_default_tile_is_largest_fitting(device):
    x = make_images((2, 1, 20, 31), device=device)
    perms = hamming_permutations(4, grid=2).to(device)
    tiles = jigsaw_tiles(x, torch.tensor([0, 1], device=device), perms, grid=2)
    assert tiles.shape == (2, 4, 1, 10, 10)
    c, nb = context_pair(x, torch.tensor([0, 7], device=device))
    assert c.shape == nb.shape == (2, 1, 6, 6)


def test_reassembly_by_inverse_permutation(device):
    """Tiles put back in the inverse-permutation order rebuild the image's grid area."""
    x = make_images((4, 2, 25, 22), device=device)
    grid = 3
    perms = hamming_permutations(8).to(device)
    pidx = torch.tensor([7, 0, 5, 2], device=device)
    tiles = jigsaw_tiles(x, pidx, perms, grid, tile_size=7)  # cells are 8x7: t=7, centred rows
    inv = perms[pidx].argsort(1)
    cells = tiles[torch.arange(4, device=device)[:, None], inv]  # [N, 9, C, 7, 7] in cell order
    image = cells.reshape(4, grid, grid, 2, 7, 7).permute(0, 3, 1, 4, 2, 5).reshape(4, 2, 21, 21)
    dy = (8 - 7) // 2
    want = torch.cat([x[:, :, r * 8 + dy : r * 8 + dy + 7, :21] for r in range(grid)], dim=2)
    assert torch.equal(image, want)


def test_empty_batch(device):
    x = make_images((0, 3, 12, 12), device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    perms = hamming_permutations(3).to(device)
    assert jigsaw_tiles(x, empty, perms).shape == (0, 9, 3, 4, 4)
    c, nb = context_pair(x, empty)
    assert c.shape == nb.shape == (0, 3, 4, 4)
    assert rotate90(x, empty).shape == (0, 3, 12, 12)
    zero_c = make_images((2, 0, 12, 12), device=device)
    assert jigsaw_tiles(zero_c, torch.zeros(2, dtype=torch.int64, device=device), perms).shape == (
        2,
        9,
        0,
        4,
        4,
    )


def test_empty_batch_standardised_without_warnings(device):
    x = make_images((0, 3, 12, 12), device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    perms = hamming_permutations(3).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # var_mean of no pixels warns
        assert jigsaw_tiles(x, empty, perms, normalize=True).shape == (0, 9, 3, 4, 4)
        ref = jigsaw_tiles_ref(x, empty, perms, 3, 4, None, True)
    assert ref.shape == (0, 9, 3, 4, 4) and ref.dtype == x.dtype


def test_special_values_and_constant_tiles(device):
    x = torch.zeros(1, 1, 6, 6, device=device)
    x[0, 0, 0, 0] = math.nan  # cell 0 of a 2x2 grid
    x[0, 0, 0, 3:] = math.inf  # cell 1: inf row next to zeros
    x[0, 0, 3:, 3:] = 5.0  # cell 3: constant
    perms = torch.arange(4, device=device)[None]
    t = jigsaw_tiles(x, torch.zeros(1, dtype=torch.int64, device=device), perms, 2, normalize=True)
    ref = jigsaw_tiles_ref(
        x, torch.zeros(1, dtype=torch.int64, device=device), perms, 2, 3, None, True
    )
    compare(t, ref, True)
    assert torch.isnan(t[0, 0]).all() and torch.isnan(t[0, 1]).all()  # NaN, and inf - inf
    assert torch.equal(t[0, 2], torch.zeros_like(t[0, 2])) and torch.equal(
        t[0, 3], torch.zeros_like(t[0, 3])
    )
    raw = jigsaw_tiles(x, torch.zeros(1, dtype=torch.int64, device=device), perms, 2)
    assert torch.isnan(raw[0, 0, 0, 0, 0]) and torch.isinf(raw[0, 1, 0, 0, 0])


def test_nan_past_the_first_pixel_of_a_flat_tile_propagates(device):
    # min == max over the other pixels, but the tile is not constant: the NaN wins wherever it
    # sits (the CPU sums in lanes of 16: pixel 29 of the tile is lane 13 of its second chunk).
    x = torch.full((1, 1, 12, 12), 3.0, device=device)
    x[0, 0, 4, 11] = math.nan  # cell 1 of a 2x2 grid (6x6 tiles), tile pixel 4 * 6 + 5
    perms = torch.arange(4, device=device)[None]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    t = jigsaw_tiles(x, zero, perms, 2, normalize=True)
    assert torch.isnan(t[0, 1]).all()  # slot 1 holds cell 1: columns 6..11 of rows 0..5
    assert torch.equal(t[0, 0], torch.zeros_like(t[0, 0]))
    compare(t, jigsaw_tiles_ref(x, zero, perms, 2, 6, None, True), True)


# ---- 3. gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_jigsaw_grad_matches_reference(device, dtype, normalize):
    x = make_images((3, 2, 13, 14), dtype, device)
    perms = hamming_permutations(5).to(device)
    pidx = torch.tensor([4, 1, 0], device=device)
    off = random_offsets(3, 9, 1, 1, device=device)
    g = make_images((3, 9, 2, 3, 3), dtype, device, seed=7)
    grads = []
    for fn in (jigsaw_tiles, jigsaw_tiles_ref):
        xr = x.clone().requires_grad_(True)
        out = fn(xr, pidx, perms, 3, 3, off, normalize)
        assert out.requires_grad
        (out.float() * g.float()).sum().backward()
        grads.append(xr.grad)
    assert grads[0].dtype == dtype
    assert_close(grads[0], grads[1], dtype=dtype)


def _gradcheck_cases(device: str) -> dict:
    """Name -> (op of one float64 input, the input): every op's tiles, gradient-checked."""
    x = make_images((3, 2, 9, 11), torch.float64, device)
    perms = hamming_permutations(5, grid=2).to(device)
    pidx = torch.tensor([0, 4, 2], device=device)
    off = random_offsets(3, 4, 1, 2, device=device)
    pos = torch.tensor([0, 3, 7], device=device)
    turns = torch.tensor([1, 2, 3], device=device)
    return {
        "jigsaw": (lambda t: jigsaw_tiles(t, pidx, perms, 2, 3, off, False), x),
        "jigsaw_normalize": (lambda t: jigsaw_tiles(t, pidx, perms, 2, 3, off, True), x),
        "context": (lambda t: torch.stack(context_pair(t, pos, 3, 2, None, True)), x[..., :9]),
        "rotate90": (lambda t: rotate90(t, turns), x[..., :9]),
    }


# One test per op: under the emulated CUDA kernels each gradcheck runs its kernels some
# thousand times, minutes apiece under ThreadSanitizer (make racecheck).
@pytest.mark.parametrize("case", ["jigsaw", "jigsaw_normalize", "context", "rotate90"])
def test_gradcheck_float64(device, case):
    fn, x = _gradcheck_cases(device)[case]
    x = x.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x,))
    if case == "rotate90":  # a gather: twice differentiable (standardised tiles are not)
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_double_backward(device):
    """Plain tiles are a gather: twice differentiable (the second derivative is the gather
    again). Standardised tiles: a clear error with the kernels; the reference is plain autograd."""
    x = make_images((3, 2, 9, 11), torch.float64, device).requires_grad_(True)
    perms = hamming_permutations(5, grid=2).to(device)
    pidx = torch.tensor([0, 4, 2], device=device)
    off = random_offsets(3, 4, 1, 2, device=device)
    pos = torch.tensor([0, 3, 7], device=device)
    assert torch.autograd.gradgradcheck(lambda t: jigsaw_tiles(t, pidx, perms, 2, 3, off), (x,))
    assert torch.autograd.gradgradcheck(
        lambda t: torch.stack(context_pair(t[..., :9], pos, 3, 2)), (x,)
    )
    tiles = jigsaw_tiles(x, pidx, perms, 2, 3, off, True)
    (g,) = torch.autograd.grad(tiles.pow(3).sum(), x, create_graph=True)
    if not _ext.HAS_OPS:
        torch.autograd.grad(g.sum(), x)
        return
    with pytest.raises(RuntimeError, match="normalize=True: a double backward"):
        torch.autograd.grad(g.sum(), x)


def test_channels_last_grad(device):
    x = make_images((2, 3, 12, 12), device=device, layout="channels_last").requires_grad_(True)
    perms = hamming_permutations(3).to(device)
    out = jigsaw_tiles(x, torch.tensor([0, 2], device=device), perms, normalize=True)
    out.pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    jigsaw_tiles_ref(xr, torch.tensor([0, 2], device=device), perms, 3, 4, None, True).pow(
        2
    ).sum().backward()
    assert_close(x.grad, xr.grad)
    k = torch.tensor([1, 3], device=device)
    weights = torch.arange(x.numel(), device=device, dtype=x.dtype).reshape(x.shape)
    xa, xb = (x.detach().clone().requires_grad_(True) for _ in range(2))
    assert xa.is_contiguous(memory_format=torch.channels_last)
    r = rotate90(xa, k)
    assert r.requires_grad
    (r * weights).sum().backward()
    (rotate90_ref(xb, k) * weights).sum().backward()
    assert torch.equal(xa.grad, xb.grad)


def test_constant_tile_gradient_is_zero(device):
    x = torch.full((1, 1, 6, 6), 3.0, device=device, requires_grad=True)
    perms = torch.arange(4, device=device)[None]
    out = jigsaw_tiles(
        x, torch.zeros(1, dtype=torch.int64, device=device), perms, 2, normalize=True
    )
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ---- 4. opcheck ---------------------------------------------------------------------------------


@requires_ops
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    x = make_images((3, 2, 10, 11), device=device).requires_grad_(requires_grad)
    x_cl = make_images((3, 3, 10, 10), torch.bfloat16, device, layout="channels_last")
    perms = hamming_permutations(4).to(device)
    pidx = torch.tensor([3, 0, 1], device=device)
    off = random_offsets(3, 9, 1, 1, device=device)
    op = torch.ops.labelkit.grid_tiles.default
    torch.library.opcheck(op, (x, pidx, perms, 3, 2, off, True, False))
    torch.library.opcheck(op, (x, pidx, perms, 3, 3, None, True, True))
    torch.library.opcheck(
        op, (x_cl.requires_grad_(requires_grad), pidx, perms, 3, 3, None, True, True)
    )
    u8 = make_images((3, 1, 9, 9), torch.uint8, device)
    torch.library.opcheck(op, (u8, pidx, perms, 3, 3, None, True, True))
    grad = torch.rand(3, 9, 2, 2, 2, device=device)
    torch.library.opcheck(
        torch.ops.labelkit._grid_tiles_backward.default,
        (grad, x.detach(), pidx, perms, 3, 2, off, True, True),
    )
    sq = x[..., :10]
    torch.library.opcheck(
        torch.ops.labelkit.rotate90.default, (sq, torch.tensor([1, 2, 3], device=device))
    )


# ---- 5. torch.compile -----------------------------------------------------------------------------


def test_compile_matches_eager(device):
    torch._dynamo.reset()
    x = make_images((4, 3, 18, 18), device=device)
    perms = hamming_permutations(6).to(device)
    pidx = torch.tensor([5, 0, 2, 2], device=device)
    off = random_offsets(4, 9, 2, 2, device=device)
    pos = torch.tensor([0, 7, 3, 4], device=device)
    k = torch.tensor([3, 0, 1, 2], device=device)

    def fn(t):
        tiles = jigsaw_tiles(t, pidx, perms, 3, 4, off, True)
        c, nb = context_pair(t, pos, 3, 5)
        return tiles, c, nb, rotate90(t, k)

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True)(x)
    # Standardised tiles are computed values: without the extension, inductor fuses the
    # reference's reductions in another order, so they compare at float32 tolerance. The
    # gathers are exact in every build.
    assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1:], eager[1:], strict=True):
        assert torch.equal(a, b)


# ---- 6. autocast ----------------------------------------------------------------------------------


def test_autocast_keeps_image_dtype(device):
    conv = torch.nn.Conv2d(1, 3, 3, padding=1).to(device)
    x = make_images((2, 1, 12, 12), device=device)
    perms = hamming_permutations(2).to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        feats = conv(x)
        assert feats.dtype == torch.bfloat16
        tiles = jigsaw_tiles(feats, torch.tensor([0, 1], device=device), perms)
        rot = rotate90(x, torch.tensor([1, 0], device=device))
    # Gathers neither up- nor down-cast: tiles have the dtype of the images they came from.
    assert tiles.dtype == torch.bfloat16 and rot.dtype == torch.float32


# ---- 7. bad input -------------------------------------------------------------------------------


def test_bad_input_messages():
    x = make_images((2, 3, 12, 12))
    perms = hamming_permutations(4)
    pidx = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        jigsaw_tiles(np.zeros((2, 3, 12, 12)), pidx, perms)
    with pytest.raises(ValueError, match="images must be 4-D"):
        jigsaw_tiles(x[0], pidx, perms)
    with pytest.raises(
        ValueError, match="images must be float16, bfloat16, float32, float64 or uint8"
    ):
        jigsaw_tiles(x.int(), pidx, perms)
    with pytest.raises(ValueError, match="smaller than the grid"):
        jigsaw_tiles(make_images((2, 3, 2, 12)), pidx, perms)
    with pytest.raises(ValueError, match="tile_size=5 is larger than a cell"):
        jigsaw_tiles(x, pidx, perms, tile_size=5)
    with pytest.raises(ValueError, match="tile_size must be an int >= 1"):
        jigsaw_tiles(x, pidx, perms, tile_size=0)
    with pytest.raises(ValueError, match=r"perm_index must hold values in \[0, 4\)"):
        jigsaw_tiles(x, torch.tensor([0, 4]), perms)
    with pytest.raises(ValueError, match=r"perm_index must hold values in \[0, 4\)"):
        jigsaw_tiles(x, torch.tensor([-1, 0]), perms)
    with pytest.raises(ValueError, match="perm_index must be int64"):
        jigsaw_tiles(x, pidx.int(), perms)
    with pytest.raises(ValueError, match=r"perm_index must have shape \[N\] = \[2\]"):
        jigsaw_tiles(x, torch.tensor([0]), perms)
    not_perm = perms.clone()
    not_perm[2, 0] = not_perm[2, 1]
    with pytest.raises(ValueError, match="permutations must be permutations of 0..8.*row 2"):
        jigsaw_tiles(x, pidx, not_perm)
    with pytest.raises(
        ValueError, match=r"permutations must have shape \[P >= 1, grid\*grid = 9\]"
    ):
        jigsaw_tiles(x, pidx, perms[:, :4])
    with pytest.raises(ValueError, match=r"offsets must have shape \[N, grid\*grid, 2\]"):
        jigsaw_tiles(x, pidx, perms, tile_size=3, offsets=torch.zeros(2, 4, 2, dtype=torch.int64))
    bad_off = torch.zeros(2, 9, 2, dtype=torch.int64)
    bad_off[1, 5, 1] = 2
    with pytest.raises(ValueError, match=r"offsets out of the cell: offsets\[1, 5\] = \[0, 2\]"):
        jigsaw_tiles(x, pidx, perms, tile_size=3, offsets=bad_off)
    with pytest.raises(ValueError, match="offsets out of the cell"):
        jigsaw_tiles(x, pidx, perms, tile_size=3, offsets=-bad_off)
    with pytest.raises(ValueError, match=r"position must hold values in \[0, 8\)"):
        context_pair(x, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="grid must be an odd int >= 3"):
        context_pair(x, pidx, grid=4)
    with pytest.raises(ValueError, match="patch_size=5 is larger than a cell"):
        context_pair(x, pidx, patch_size=5)
    with pytest.raises(
        ValueError, match=r"offsets must have shape \[N, 2 \(center, neighbour\), 2\]"
    ):
        context_pair(x, pidx, patch_size=3, offsets=bad_off)
    with pytest.raises(ValueError, match=r"k must hold values in \[0, 4\)"):
        rotate90(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="images must be square"):
        rotate90(make_images((2, 3, 12, 10)), pidx)
    with pytest.raises(ValueError, match="task must be one of"):
        make_pretext_batch(x, "colorize")
    with pytest.raises(ValueError, match="grid must be an int >= 2"):
        jigsaw_tiles(x, pidx, perms, grid=1)


@requires_ops
def test_kernels_reject_out_of_range_values_without_reading_them():
    """The eager checks are skipped under torch.compile; the CPU kernel then still raises."""
    x = make_images((2, 1, 9, 9))
    perms = hamming_permutations(3)
    op = torch.ops.labelkit.grid_tiles
    with pytest.raises(RuntimeError, match="index out of"):
        op(x, torch.tensor([0, 3]), perms, 3, 3, None, True, False)
    with pytest.raises(RuntimeError, match="cell out of"):
        op(x, torch.tensor([0, 0]), perms + 1, 3, 3, None, True, False)
    off = torch.zeros(2, 9, 2, dtype=torch.int64)
    off[0, 3, 0] = 1
    with pytest.raises(RuntimeError, match="offsets out of the cell"):
        op(x, torch.tensor([0, 0]), perms, 3, 3, off, True, False)
    with pytest.raises(RuntimeError, match="is larger than a cell"):
        op(x, torch.tensor([0, 0]), perms, 3, 4, None, True, False)
    with pytest.raises(RuntimeError, match=r"k must hold values in \[0, 4\)"):
        torch.ops.labelkit.rotate90(x, torch.tensor([0, -1]))
    with pytest.raises(RuntimeError, match="gradients need floating-point images"):
        torch.ops.labelkit._grid_tiles_backward(
            torch.zeros(2, 9, 1, 3, 3),
            x.to(torch.uint8),
            torch.tensor([0, 0]),
            perms,
            3,
            3,
            None,
            True,
            False,
        )


# ---- make_pretext_batch ----------------------------------------------------------------------------


def test_make_pretext_batch(device):
    x = make_images((6, 3, 33, 33), device=device)
    for task, classes, shape in (
        ("jigsaw", 100, (6, 9, 3, 8, 8)),
        ("context", 8, (6, 2, 3, 8, 8)),
        ("rotation", 4, (6, 3, 33, 33)),
    ):
        b1 = make_pretext_batch(x, task, torch.Generator().manual_seed(3), tile_size=8)
        b2 = make_pretext_batch(x, task, torch.Generator().manual_seed(3), tile_size=8)
        assert isinstance(b1, PretextBatch) and b1.num_classes == classes
        assert b1.inputs.shape == shape and b1.labels.shape == (6,)
        assert b1.labels.device == x.device and b1.labels.dtype == torch.int64
        assert 0 <= int(b1.labels.min()) and int(b1.labels.max()) < classes
        assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.labels, b2.labels)


def test_make_pretext_batch_agrees_with_the_ops(device):
    x = make_images((5, 1, 27, 27), device=device)
    perms = hamming_permutations(12).to(device)
    b = make_pretext_batch(
        x, "jigsaw", torch.Generator().manual_seed(0), permutations=perms, jitter=False
    )
    assert torch.equal(b.inputs, jigsaw_tiles(x, b.labels, perms))
    b = make_pretext_batch(
        x, "context", torch.Generator().manual_seed(0), jitter=False, tile_size=6
    )
    c, nb = context_pair(x, b.labels, patch_size=6)
    assert torch.equal(b.inputs[:, 0], c) and torch.equal(b.inputs[:, 1], nb)
    b = make_pretext_batch(x, "rotation", torch.Generator().manual_seed(0))
    assert torch.equal(b.inputs, rotate90(x, b.labels))
    b = make_pretext_batch(x, "rotation", all_rotations=True)
    assert b.inputs.shape == (20, 1, 27, 27) and b.labels.tolist() == [0, 1, 2, 3] * 5
    for i in range(4):
        assert torch.equal(b.inputs[i], torch.rot90(x[0], i, dims=(-2, -1)))


def test_make_pretext_batch_jitter_and_normalize():
    x = make_images((64, 1, 30, 30))
    jittered = make_pretext_batch(x, "jigsaw", torch.Generator().manual_seed(1), tile_size=6)
    fixed = make_pretext_batch(
        x, "jigsaw", torch.Generator().manual_seed(1), tile_size=6, jitter=False
    )
    assert torch.equal(jittered.labels, fixed.labels)  # labels are drawn before the offsets
    # 5 positions per axis for each of 576 tiles: all of them centred would mean no jitter.
    assert not torch.equal(jittered.inputs, fixed.inputs)
    norm = make_pretext_batch(
        x, "jigsaw", torch.Generator().manual_seed(1), tile_size=6, normalize=True
    )
    var, mean = torch.var_mean(norm.inputs, dim=(-2, -1), correction=0)
    assert_close(mean, torch.zeros_like(mean), atol=1e-5)
    assert_close(var, torch.ones_like(var), atol=1e-5)


# ---- 8. the fallback -------------------------------------------------------------------------------


def test_fallback_routing_matches_build():
    for op in ("grid_tiles", "_grid_tiles_backward", "rotate90"):
        assert _ext.has_kernel(op, "cpu") == _ext.HAS_OPS


# ---- 9. property tests against the per-image oracle -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 4),
    c=st.integers(1, 3),
    grid=st.integers(2, 4),
    extra_h=st.integers(0, 7),
    extra_w=st.integers(0, 7),
    cell=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8, torch.bfloat16]),
    normalize=st.booleans(),
    jitter=st.booleans(),
)
def test_jigsaw_property(
    n, c, grid, extra_h, extra_w, cell, seed, layout, dtype, normalize, jitter
):
    H, W = grid * cell + extra_h, grid * cell + extra_w
    ch, cw = H // grid, W // grid
    g = torch.Generator().manual_seed(seed)
    t = int(torch.randint(1, min(ch, cw) + 1, (1,), generator=g))
    x = make_images((n, c, H, W), dtype, seed=seed, layout=layout)
    P = int(torch.randint(1, 6, (1,), generator=g))
    perms = random_perms(P, grid * grid, seed)
    pidx = torch.randint(P, (n,), generator=g)
    offsets = random_offsets(n, grid * grid, ch - t, cw - t, seed) if jitter else None
    got = jigsaw_tiles(x, pidx, perms, grid, t, offsets, normalize)
    assert got.shape == (n, grid * grid, c, t, t)
    if n:
        want = jigsaw_oracle(x, pidx, perms, grid, t, offsets, normalize)
        if normalize:
            assert_close(got, torch.from_numpy(want), dtype=got.dtype)
        else:
            np.testing.assert_array_equal(got.double().numpy(), want)
    if not normalize and n and t == ch == cw and not extra_h and not extra_w:
        # Reassembly: the inverse permutation puts every cell back; the grid tiles the image.
        inv = perms[pidx].argsort(1)
        cells = got[torch.arange(n)[:, None], inv]
        image = cells.reshape(n, grid, grid, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(n, c, H, W)
        assert torch.equal(image, x)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 3),
    grid=st.sampled_from([3, 5]),
    cell=st.integers(1, 5),
    extra=st.integers(0, 4),
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    dtype=st.sampled_from([torch.float32, torch.uint8, torch.float16]),
    jitter=st.booleans(),
)
def test_context_and_rotation_property(n, c, grid, cell, extra, seed, layout, dtype, jitter):
    S = grid * cell + extra
    g = torch.Generator().manual_seed(seed)
    p = int(torch.randint(1, S // grid + 1, (1,), generator=g))
    x = make_images((n, c, S, S), dtype, seed=seed, layout=layout)
    pos = torch.randint(8, (n,), generator=g)
    offsets = random_offsets(n, 2, S // grid - p, S // grid - p, seed) if jitter else None
    centre, neighbour = context_pair(x, pos, grid, p, offsets)
    oc, onb = context_oracle(x, pos, grid, p, offsets)
    np.testing.assert_array_equal(centre.double().numpy(), oc)
    np.testing.assert_array_equal(neighbour.double().numpy(), onb)
    k = torch.randint(4, (n,), generator=g)
    r = rotate90(x, k)
    np.testing.assert_array_equal(r.double().numpy(), rotate_oracle(x, k))
    # Four quarter turns (by way of k, then 4 - k) are the identity.
    assert torch.equal(rotate90(r, (4 - k) % 4), x)
