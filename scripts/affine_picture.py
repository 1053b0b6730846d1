"""Draw docs/ops/affine.png: real images before and after random per-sample affine warps.

    PYTHONPATH=. python scripts/affine_picture.py [--data-dir ../shared/data] [--out docs/ops/affine.png]

Top block: CIFAR-10 test images; bottom block: PneumoniaMNIST test chest X-rays. In each block the
first row is the originals and the next rows are `affine_grid_sample` with random STN-style θ
(rotation, anisotropic scale, shear, shift; zeros / border / reflection padding).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from labelkit_ext import affine_grid_sample
from labelkit_ext.data.cifar import load_cifar10
from labelkit_ext.data.medmnist import load_medmnist_npz
from labelkit_ext.data.paths import resolve_data_dir
from labelkit_ext.engine.report import new_figure, save_figure

PADDINGS = ("zeros", "border", "reflection")


def random_theta(n: int, g: torch.Generator) -> torch.Tensor:
    """STN-augmentation-like θ: rotation ±40°, scale 0.7-1.4 per axis, shear ±0.3, shift ±0.25."""
    u = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    angle = u(n) * math.radians(40)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    shear = torch.eye(2).repeat(n, 1, 1)
    shear[:, 0, 1] = u(n) * 0.3
    scale = torch.exp(u(n, 2) * math.log(1.4))
    A = rot @ shear * scale.unsqueeze(1)
    return torch.cat([A, u(n, 2, 1) * 0.25], dim=-1)


def images(data_dir: Path, count: int) -> dict[str, torch.Tensor]:
    cifar = load_cifar10(data_dir).splits["test"].images[:count].float() / 255
    xray = (
        load_medmnist_npz(data_dir / "pneumoniamnist.npz", "pneumoniamnist")
        .splits["test"]
        .images[:count]
    )
    xray = xray.float().div(255)
    return {"CIFAR-10": cifar, "PneumoniaMNIST": xray}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default=None, help="default: the project's shared data folder")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/ops/affine.png"
    )
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    blocks = images(resolve_data_dir(args.data_dir), args.count)
    rows = 1 + len(PADDINGS)
    fig = new_figure(1.3 * args.count, 1.35 * rows * len(blocks))
    axes = fig.subplots(rows * len(blocks), args.count)
    for b, (name, x) in enumerate(blocks.items()):
        theta = random_theta(x.shape[0], g)
        shown = [("original", x)] + [
            (f"warped, {pad}", affine_grid_sample(x, theta, padding_mode=pad)) for pad in PADDINGS
        ]
        for r, (label, imgs) in enumerate(shown):
            for i in range(args.count):
                ax = axes[b * rows + r, i]
                img = imgs[i].clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
                ax.imshow(
                    img,
                    cmap="gray" if img.ndim == 2 else None,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_ylabel(f"{name}\n{label}" if r == 0 else label, fontsize=7)
    print(f"wrote {save_figure(fig, args.out)}")


if __name__ == "__main__":
    main()
