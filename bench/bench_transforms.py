"""Benchmark the per-image training and evaluation transforms of the data sets: ours
(``labelkit_ext.data.ImageTransform``) vs the torchvision v2 ``Compose`` it replaces
(``RandomCrop(size, padding=size // 8)`` + ``RandomHorizontalFlip`` + ``ToDtype`` +
``Normalize``). The DataLoader calls one of them once per image per epoch, in the main process
unless it has workers (``labelkit run ... --num-workers``).

    python bench/bench_transforms.py                    # 1 and 3 channels at 16, 32, 224 px
    python bench/bench_transforms.py --sizes 28 --channels 1 --images 256

Before timing, both providers transform the same uint8 images from the same torch seed: the
outputs must be equal bit for bit (and the random stream left in the same state). Time per image
is the best of ``--repeats`` passes over ``--images`` images.

Writes ``<out>/<device>/transforms.csv`` and ``transforms.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # an installed labelkit_ext, if any, still wins

import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench import common  # noqa: E402
from labelkit_ext.data import ImageTransform  # noqa: E402

COLUMNS = ("kind", "channels", "size", "provider", "device", "us_per_image",
           "speedup_vs_torchvision", "check", "torch", "threads")  # fmt: skip
KEY = ("kind", "channels", "size")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=common.size_list, default=[16, 32, 224], help="image sizes")
    p.add_argument("--channels", type=common.size_list, default=[1, 3], help="channel counts")
    p.add_argument("--images", type=int, default=512, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes (the best is kept)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def providers(kind: str, channels: int, size: int) -> dict[str, Callable]:
    """The two transforms of one case: train (crop + flip for RGB, as CIFAR) or eval."""
    mean, std = (0.5,) * channels, (0.25,) * channels
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if kind == "eval":
        return {"torchvision": v2.Compose(tail), "ours": ImageTransform(mean, std)}
    padding, flip = max(1, size // 8), channels == 3
    head = [v2.RandomCrop(size, padding=padding)] + ([v2.RandomHorizontalFlip()] if flip else [])
    return {
        "torchvision": v2.Compose(head + tail),
        "ours": ImageTransform(mean, std, padding, flip),
    }


def _outputs(transform: Callable, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    out = [transform(x) for x in images]
    return out, torch.rand(1)  # the state the transform left the random stream in


def check(candidates: dict[str, Callable], images: torch.Tensor) -> str:
    want, state = _outputs(candidates["torchvision"], images)
    got, after = _outputs(candidates["ours"], images)
    same = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    return "equal" if same and torch.equal(state, after) else "MISMATCH"


def per_image_us(transform: Callable, images: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        for x in images:
            transform(x)
        best = min(best, time.perf_counter() - tic)
    return best / len(images) * 1e6


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    common.warn_if_busy(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        for channels in args.channels:
            images = torch.randint(0, 256, (args.images, channels, size, size), generator=g)
            images = images.to(torch.uint8)
            for kind in ("train", "eval"):
                candidates = providers(kind, channels, size)
                verdict = check(candidates, images)
                for name, transform in candidates.items():
                    rows.append({
                        "kind": kind, "channels": channels, "size": size, "provider": name,
                        "us_per_image": round(per_image_us(transform, images, args.repeats), 2),
                        "check": verdict, **common.environment(device),
                    })  # fmt: skip
    for r in rows:  # add_speedups divides time_ms; here the time is per image
        r["time_ms"] = r["us_per_image"]
    common.add_speedups(rows, KEY, baselines=("torchvision",))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    folder = args.out / common.device_slug(torch.device("cpu"))
    common.write_csv(rows, folder / "transforms.csv", COLUMNS)
    table = common.markdown_table(
        [r for r in rows if r["provider"] == "ours"],
        [("kind", "transform"), ("channels", "C"), ("size", "px"), ("us_per_image", "ours µs"),
         ("speedup_vs_torchvision", "× torchvision v2"), ("check", "outputs")],
    )  # fmt: skip
    (folder / "transforms.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["check"] == "equal" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
