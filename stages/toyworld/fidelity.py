"""How faithful a 3D asset is to its toy-world reference: scores against the known objects.

Every score renders the asset from **held-out views** (azimuths 22.5° + k·45° at elevations
−10° and 45°, outside the training cameras' 0–30° band, at the turntable distance and field of
view) and the prompt's objects from the same cameras with the world's renderer:

- ``identity``: the object nearest the asset (highest PSNR averaged over the views);
- ``reference``: the reference image's object (nearest render from the reference camera);
- ``psnr_reference``: mean novel-view PSNR (dB) of the asset to the reference's object;
- ``consistency``: the fraction of views whose own nearest object is ``identity`` (a
  multi-faced asset shows different objects from different sides);
- ``iou``: the asset's solid (density above the mesh threshold on the export grid: the inside
  of its marching-cubes mesh) against the reference's object's voxelisation on the same grid.

Diversity of a prompt is the number of distinct identities among its variants
(:func:`distinct_identities`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from stages.scene.base import Cameras, grid_points
from stages.scene.cameras import concat_cameras, orbit_cameras
from stages.toyworld.guidance import nearest_object
from stages.toyworld.render import inside, render_objects
from stages.toyworld.world import World

FAITHFUL_PSNR = 17.0
"""dB to the reference's object above which a recovered asset counts as faithful: a generated
world's objects are drawn at least this far apart (``generate.distinct_psnr``), so an asset this
close to its reference is closer to it than any other object of the prompt is."""
HELDOUT_ELEVATIONS = (-10.0, 45.0)
HELDOUT_AZIMUTHS = 8
"""Views per held-out elevation, starting at azimuth 22.5° (between the four trained-looking
front/side/back directions)."""


def heldout_cameras(distance: float = 3.0, fovy: float = 40.0) -> Cameras:
    """16 cameras: 8 azimuths (22.5° + k·45°) at each of the held-out elevations."""
    return concat_cameras(
        [orbit_cameras(HELDOUT_AZIMUTHS, e, distance, fovy, azimuth_start=22.5) for e in HELDOUT_ELEVATIONS]
    )


def psnr(a: Tensor, b: Tensor, dims: tuple[int, ...] = (-3, -2, -1)) -> Tensor:
    """PSNR (dB) of images in [0, 1] over ``dims``."""
    mse = (a.float() - b.float()).pow(2).mean(dim=dims).clamp_min(1e-10)
    return -10.0 * mse.log10()


@dataclass
class Fidelity:
    """Scores of one asset (module docstring)."""

    identity: int
    reference: int | None
    psnr_reference: float
    psnr_identity: float
    consistency: float
    iou: float
    psnr_objects: list[float] = field(default_factory=list)
    """Mean held-out PSNR to every object of the prompt."""

    @property
    def identity_correct(self) -> bool | None:
        return None if self.reference is None else self.identity == self.reference

    def metrics(self) -> dict[str, float]:
        """Flat ``toy_*`` numbers (NaN where a score does not apply)."""
        nan = math.nan
        return {
            "toy_identity": float(self.identity),
            "toy_reference": nan if self.reference is None else float(self.reference),
            "toy_identity_correct": nan if self.reference is None else float(self.identity == self.reference),
            "toy_psnr_reference": self.psnr_reference,
            "toy_psnr_identity": self.psnr_identity,
            "toy_consistency": self.consistency,
            "toy_iou": self.iou,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "identity_correct": self.identity_correct}


def view_scores(world: World, prompt: str, views: Tensor, cameras: Cameras) -> Tensor:
    """(K, V) PSNR of asset views (V, 3, H, W) to each of the prompt's objects from ``cameras``."""
    height, width = views.shape[-2:]
    objects = render_objects(world.prompt_table(prompt), cameras.c2w, cameras.fovy, height, width, world.shading, 2).rgb
    return psnr(objects, views[None].expand_as(objects))


def solid_iou(occupied: Tensor, world: World, prompt: str, index: int, radius: float) -> float:
    """IoU of an (R, R, R) occupancy on ``grid_points(radius, R)`` with object ``index``'s inside."""
    points = grid_points(radius, occupied.shape[0]).reshape(-1, 3)
    truth = inside(world.prompt_table(prompt), points)[index]
    solid = occupied.reshape(-1).bool()
    union = int((solid | truth).sum())
    return float((solid & truth).sum()) / union if union else math.nan


def scene_occupancy(scene: torch.nn.Module, resolution: int, threshold: float | str = "auto") -> Tensor | None:
    """(R, R, R) bool: where the scene's density exceeds the mesh export threshold (None: the
    scene has no density field)."""
    if not hasattr(scene, "density_grid"):
        return None
    from stages.export.mesh import resolve_threshold

    density = scene.density_grid(resolution).detach().float().cpu()
    level = resolve_threshold(density.numpy(), threshold)
    return density > level


def score_views(world: World, prompt: str, views: Tensor, cameras: Cameras, reference: int | None) -> dict[str, Any]:
    """Identity, PSNRs and consistency of asset views rendered from ``cameras``."""
    per_view = view_scores(world, prompt, views, cameras)  # (K, V)
    mean = per_view.mean(1)
    identity = int(mean.argmax())
    return {
        "identity": identity,
        "reference": reference,
        "psnr_reference": math.nan if reference is None else float(mean[reference]),
        "psnr_identity": float(mean[identity]),
        "consistency": float((per_view.argmax(0) == identity).float().mean()),
        "psnr_objects": [float(v) for v in mean],
    }


def score_scene(
    scene: torch.nn.Module,
    world: World,
    prompt: str,
    reference_image: Any | None = None,
    resolution: int = 64,
    mesh_resolution: int = 48,
    mesh_threshold: float | str = "auto",
    distance: float = 3.0,
    fovy: float = 40.0,
) -> Fidelity:
    """All scores of a scene made for ``prompt`` (with ``reference_image``, the IMAGE it was made from)."""
    from stages.scene.views import render_views

    cameras = heldout_cameras(distance, fovy)
    views = render_views(scene, cameras, resolution)["rgb"]
    reference = None if reference_image is None else nearest_object(world, prompt, reference_image)[0]
    scores = score_views(world, prompt, views, cameras, reference)
    target = scores["identity"] if reference is None else reference
    occupied = scene_occupancy(scene, mesh_resolution, mesh_threshold)
    radius = float(getattr(getattr(scene, "config", None), "radius", 1.0))
    iou = math.nan if occupied is None else solid_iou(occupied, world, prompt, target, radius)
    return Fidelity(iou=iou, **scores)


def distinct_identities(identities: Iterable[int]) -> int:
    """Diversity of a prompt's variants: how many different objects they recovered."""
    return len(set(int(i) for i in identities))
