"""Draw docs/ops/pretext.png: one real chest X-ray (shared PneumoniaMNIST), its 9 jigsaw tiles,
the tiles in a Hamming-set shuffle, a context pair and the four rotations, all made by the ops.

    PYTHONPATH=. python docs/ops/pretext_figure.py [--data ../shared/data] [--index 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from labelkit_ext import context_pair, hamming_permutations, jigsaw_tiles, rotate90  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_xray(data_dir: Path, index: int) -> torch.Tensor:
    """Test image ``index`` of pneumoniamnist.npz as ``[1, 1, 28, 28]`` uint8."""
    with np.load(data_dir / "pneumoniamnist.npz") as f:
        return torch.from_numpy(f["test_images"][index].copy())[None, None]


def show(ax, img: torch.Tensor, title: str = "") -> None:
    ax.imshow(img.squeeze().float().numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("pretext.png"))
    args = p.parse_args()

    x = load_xray(args.data, args.index)
    perms = hamming_permutations(100)
    ident = torch.arange(9)[None]
    label = torch.tensor([37])
    cells = jigsaw_tiles(x, torch.zeros(1, dtype=torch.int64), ident)[0]  # [9, 1, 9, 9]
    shuffled = jigsaw_tiles(x, label, perms)[0]
    centre, neighbour = context_pair(x, torch.tensor([2]))  # neighbour 2: top-right
    rotations = rotate90(x.expand(4, -1, -1, -1), torch.arange(4))

    fig = plt.figure(figsize=(14, 5.2))
    grid = fig.add_gridspec(3, 13, wspace=0.6, hspace=0.5)
    show(fig.add_subplot(grid[:, 0:3]), x[0], "chest X-ray (PneumoniaMNIST, 28x28)")
    for j in range(9):
        r, c = divmod(j, 3)
        show(fig.add_subplot(grid[r, 3 + c]), cells[j], f"cell {j}")
    order = perms[int(label)].tolist()
    for j in range(9):
        r, c = divmod(j, 3)
        show(fig.add_subplot(grid[r, 6 + c]), shuffled[j], f"slot {j} <- cell {order[j]}")
    show(fig.add_subplot(grid[0, 10]), centre[0], "centre")
    show(fig.add_subplot(grid[0, 11]), neighbour[0], "neighbour 2")
    for k in range(4):
        show(fig.add_subplot(grid[1 + k // 2, 10 + k % 2]), rotations[k], f"k={k}")
    fig.suptitle(
        f"jigsaw_tiles (grid 3, label = permutation {int(label)} of hamming_permutations(100)), "
        "context_pair, rotate90",
        fontsize=10,
    )
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
