"""The four pretext tasks: their settings, networks, and one training step each.

Rotation, jigsaw and context batches (inputs and labels) are built on the images' device by
``labelkit_ext.make_pretext_batch`` (our gather kernels, or their references without ``_C``),
one call per batch. The contrastive task (SimCLR's NT-Xent over two augmented views) warps its
views in ``warp_views``: per-sample affine matrices, one batched
``labelkit_ext.affine_grid_sample`` (no sampling grid stored). Under torchrun its negatives are
every rank's views (``nt_xent(..., across_ranks=True)``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from labelkit_ext.checks import check_fields
from labelkit_ext.engine.distributed import current_dist, gather_rows
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.pretext.networks import Backbone, PretextNet
from labelkit_ext.ops.affine import affine_grid_sample
from labelkit_ext.ops.pretext import (
    DEFAULT_NUM_CANDIDATES,
    MAX_TABLE_ENTRIES,
    PretextBatch,
    candidate_count,
    hamming_permutations,
    make_pretext_batch,
)

__all__ = [
    "PRETEXT_TASKS",
    "PretextSettings",
    "StepOutput",
    "ViewParams",
    "build_pretext_net",
    "check_task_images",
    "contrastive_views",
    "default_tile_size",
    "jigsaw_permutations",
    "make_batch",
    "nt_xent",
    "pretext_step",
    "sample_view_params",
    "view_matrices",
    "warp_views",
]

PRETEXT_TASKS = ("rotation", "jigsaw", "context", "contrastive")
#: The largest grid whose jigsaw candidate table hamming_permutations builds (MAX_TABLE_ENTRIES).
MAX_GRID = math.isqrt(MAX_TABLE_ENTRIES // DEFAULT_NUM_CANDIDATES)


def default_tile_size(image_size: int, grid: int) -> int:
    """Tile (jigsaw) / patch (context) side for a ``grid x grid`` cut of ``image_size`` images:
    the cell minus a gap of a quarter cell, at least 2 px, so tiles never touch and jitter has
    room. The jigsaw paper's 64 px tiles in 85 px cells (255 px images) follow this rule;
    28 px images give 9 px cells and 7 px tiles."""
    cell = image_size // grid
    if cell < 3:
        raise UsageError(
            f"images of {image_size} px are too small for a {grid}x{grid} grid "
            "(cells need at least 3 px); use a smaller --grid or a larger --image-size"
        )
    return cell - max(2, cell // 4)


@dataclass(frozen=True)
class PretextSettings:
    """How the pretext batches and heads are made (the same for every seed)."""

    grid: int = 3  # cells per side for jigsaw and context (context needs it odd)
    tile_size: int | None = None  # None: default_tile_size(image size, grid)
    num_permutations: int = 100  # jigsaw classes: maximal-Hamming permutations
    jitter: bool = True  # random tile offsets inside their cells
    normalize_tiles: bool = True  # per-tile standardisation (blocks low-level shortcuts)
    all_rotations: bool = False  # every image at all 4 rotations (RotNet) vs one random
    hidden: int = 256  # hidden width of the pretext heads
    projection_dim: int = 64  # contrastive projection size
    temperature: float = 0.5  # NT-Xent temperature
    max_angle: float = 15.0  # contrastive views: rotation range (degrees)
    max_zoom: float = 1.5  # ... zoom in up to this factor (a random resized crop)
    max_shift: float = 0.1  # ... translation, as a share of the side
    jitter_strength: float = 0.4  # ... brightness/contrast jitter

    def __post_init__(self) -> None:
        check_fields(self)
        if not 2 <= self.grid <= MAX_GRID:
            raise UsageError(f"grid must be in [2, {MAX_GRID}], got {self.grid}")
        if self.tile_size is not None and self.tile_size < 1:
            raise UsageError(
                f"tile_size must be >= 1 (leave it out for the automatic size), got {self.tile_size}"
            )
        most = candidate_count(self.grid)
        if not 2 <= self.num_permutations <= most:
            raise UsageError(
                f"permutations (num_permutations) must be in [2, {most}] for a "
                f"{self.grid}x{self.grid} grid, got {self.num_permutations}"
            )
        if self.hidden < 1:
            raise UsageError(f"hidden must be >= 1, got {self.hidden}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.max_zoom < 1:
            raise UsageError(f"max_zoom must be >= 1, got {self.max_zoom}")

    def tile_for(self, image_size: int) -> int:
        """The tile / patch side for ``image_size`` images; a given tile must fit its cell."""
        if self.tile_size is None:
            return default_tile_size(image_size, self.grid)
        cell = image_size // self.grid
        if self.tile_size > cell:
            raise UsageError(
                f"tile_size {self.tile_size} is larger than a cell of the {self.grid}x{self.grid} "
                f"grid on {image_size} px images ({cell} px): use a --tile-size of at most "
                f"{cell}, a smaller --grid or a larger --image-size"
            )
        return self.tile_size

    def to_dict(self) -> dict:
        return asdict(self)


def _num_outputs(task: str, settings: PretextSettings) -> tuple[int, int]:
    """(inputs per sample, head outputs) of ``task``."""
    if task == "rotation":
        return 1, 4
    if task == "jigsaw":
        return settings.grid**2, settings.num_permutations
    if task == "context":
        return 2, 8
    if task == "contrastive":
        return 1, settings.projection_dim
    raise ValueError(f"task must be one of {PRETEXT_TASKS}, got {task!r}")


#: Tasks that turn the image about its center (rotate90, the views' rotations): square only.
SQUARE_TASKS = ("rotation", "contrastive")


def check_task_images(task: str, dataset: Dataset) -> None:
    """Refuse, before any training, images ``task`` cannot take: non-square ones for the
    rotation and contrastive tasks (they failed in the first batch)."""
    if task in SQUARE_TASKS and len(dataset):
        h, w = dataset[0][0].shape[-2:]
        if h != w:
            raise UsageError(
                f"the {task} pretext needs square images, got {h}x{w}: crop or resize them "
                "(jigsaw and context take any shape)"
            )


def build_pretext_net(task: str, backbone: Backbone, settings: PretextSettings) -> PretextNet:
    """``backbone`` with ``task``'s head: rotation 1 image -> 4, context 2 patches (siamese)
    -> 8 positions, jigsaw grid^2 tiles (shared backbone, features concatenated in slot order)
    -> num_permutations, contrastive 1 view -> projection_dim."""
    if task == "context" and settings.grid % 2 == 0:
        raise UsageError(f"the context task needs an odd grid, got {settings.grid}")
    inputs, outputs = _num_outputs(task, settings)
    return PretextNet(backbone, inputs, outputs, settings.hidden)


# ---- the contrastive task -------------------------------------------------------------------


@dataclass
class ViewParams:
    """Per-sample random augmentation of one view: rotation (degrees), zoom (>= 1), shift
    (fractions of the side, (N, 2)), contrast and brightness (in the normalised image's units)."""

    angle: torch.Tensor
    zoom: torch.Tensor
    shift: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor


def sample_view_params(n: int, settings: PretextSettings, generator: torch.Generator) -> ViewParams:
    """Draw ``ViewParams`` for ``n`` samples from ``generator`` (CPU), all at once."""

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1  # U(-1, 1)

    s = settings.jitter_strength
    return ViewParams(
        angle=uniform(n) * settings.max_angle,
        zoom=torch.exp(torch.rand(n, generator=generator) * math.log(settings.max_zoom)),
        shift=uniform(n, 2) * settings.max_shift,
        contrast=1 + uniform(n) * s,
        brightness=uniform(n) * s,
    )


def view_matrices(params: ViewParams, side: int) -> torch.Tensor:
    """(N, 2, 3) output-to-input affine matrices in ``F.affine_grid``'s normalised
    coordinates for square ``side``-px images: rotate by ``angle`` (counter-clockwise on the
    displayed image), zoom by ``zoom`` about the center, then shift by ``shift`` sides.
    The same warp as torchvision v2's ``affine(angle, translate=shift * side, scale=zoom)``
    (tested against it)."""
    a = torch.deg2rad(-params.angle.double())
    cos, sin = torch.cos(a) / params.zoom, torch.sin(a) / params.zoom
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shift = params.shift.double() * 2  # sides -> normalised units ([-1, 1] spans a side)
    offset = -(linear @ shift.unsqueeze(-1))
    return torch.cat([linear, offset], -1).float()


def warp_views(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Rotate, zoom and shift each image by its own parameters (bilinear, zero fill), in one
    batched pass of ``labelkit_ext.affine_grid_sample`` (no sampling grid is stored).

    (torchvision v2's ``affine`` would need a Python loop over the batch, one parameter set per
    call: ~100x slower here.)
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"contrastive views need square images, got {tuple(images.shape[-2:])}")
    theta = view_matrices(params, images.shape[-1]).to(images.device, images.dtype)
    return affine_grid_sample(
        images, theta, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def contrastive_views(
    images: torch.Tensor, settings: PretextSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of each (normalised) image: geometric warp
    (``warp_views``) then per-sample contrast and brightness (batched tensor arithmetic)."""

    def view() -> torch.Tensor:
        params = sample_view_params(len(images), settings, generator)
        warped = warp_views(images, params)
        shape = (-1,) + (1,) * (images.ndim - 1)
        contrast = params.contrast.to(images.device, images.dtype).view(shape)
        brightness = params.brightness.to(images.device, images.dtype).view(shape)
        mean = warped.mean(dim=(-3, -2, -1), keepdim=True)
        return (warped - mean) * contrast + mean + brightness

    return view(), view()


def nt_xent(
    z: torch.Tensor, temperature: float, *, across_ranks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent loss of ``z`` (2N, d), rows ``i`` and ``i + N`` being two views of one
    image: cross-entropy of each row's cosine similarities / temperature (itself excluded)
    with its partner as the class. Returns (mean loss, (2N,) bool partner-is-top-1).

    ``across_ranks`` (training under torchrun): the rows of every rank are the candidates, as
    in SimCLR's global batch; they are gathered with their gradients, and each rank's loss is
    the mean over its own rows, so DDP's gradient average is that of the global batch's mean."""
    if z.ndim != 2 or z.shape[0] % 2 or z.shape[0] < 4:
        raise ValueError(f"z must be (2N, d) with N >= 2, got shape {tuple(z.shape)}")
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    keys, offset = gather_rows(z, current_dist()) if across_ranks else (z, 0)
    rows = torch.arange(2 * n, device=z.device)
    logits = z @ keys.T / temperature
    logits = logits.index_put((rows, offset + rows), logits.new_tensor(float("-inf")))
    partner = offset + rows.roll(n)
    return F.cross_entropy(logits, partner), logits.argmax(1) == partner


# ---- one step of any task -----------------------------------------------------------------


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean loss of the batch (differentiable)
    correct: torch.Tensor  # pretext decisions right (class, or partner top-1), on the device
    count: int  # pretext decisions made


@functools.lru_cache(maxsize=8)
def _hamming_set(n: int, grid: int) -> torch.Tensor:
    return hamming_permutations(n, grid)


def jigsaw_permutations(
    settings: PretextSettings, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The jigsaw classes: ``hamming_permutations(settings.num_permutations, settings.grid)``,
    computed once per process (the greedy search over all 9! orders takes seconds)."""
    return _hamming_set(settings.num_permutations, settings.grid).to(device)


def make_batch(
    task: str,
    images: torch.Tensor,
    settings: PretextSettings,
    generator: torch.Generator,
    permutations: torch.Tensor | None = None,
) -> PretextBatch:
    """The labelled batch of ``task`` (rotation, jigsaw or context) from ``images``: one
    ``make_pretext_batch`` call with these settings (jigsaw's default permutations:
    ``hamming_permutations(settings.num_permutations, settings.grid)``)."""
    if task == "jigsaw" and permutations is None:
        permutations = jigsaw_permutations(settings, images.device)
    return make_pretext_batch(
        images,
        task,
        generator,
        grid=settings.grid,
        tile_size=settings.tile_for(images.shape[-1]) if task != "rotation" else None,
        permutations=permutations if task == "jigsaw" else None,
        jitter=settings.jitter,
        normalize=settings.normalize_tiles,
        all_rotations=settings.all_rotations,
    )


def pretext_step(
    task: str,
    net: PretextNet,
    images: torch.Tensor,
    settings: PretextSettings,
    generator: torch.Generator,
    permutations: torch.Tensor | None = None,
    *,
    across_ranks: bool = False,
) -> StepOutput:
    """Build ``task``'s batch from ``images`` (already on the net's device) with ``generator``,
    run ``net`` and return the loss and the pretext accuracy counts. ``across_ranks``: the
    contrastive task's candidates are every rank's views (:func:`nt_xent`; training)."""
    if task == "contrastive":
        first, second = contrastive_views(images, settings, generator)
        z = net(torch.cat([first, second]))
        loss, hits = nt_xent(z, settings.temperature, across_ranks=across_ranks)
        return StepOutput(loss, hits.sum(), hits.numel())
    batch = make_batch(task, images, settings, generator, permutations)
    logits = net(batch.inputs)
    loss = F.cross_entropy(logits.float(), batch.labels)
    correct = (logits.argmax(1) == batch.labels).sum()
    return StepOutput(loss, correct, batch.labels.numel())
