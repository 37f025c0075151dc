"""The toy world: prompts whose objects are known, and exact "diffusion models" over their renders.

Each prompt names a small set of procedural 3D objects (:mod:`stages.toyworld.world`, data in a
YAML file); :mod:`stages.toyworld.render` renders them analytically from any camera; the
guidance (:class:`ToyWorldGuidance`, both the IP and the multi-view side) and the reference
sampler (:class:`ToyWorldReferenceSampler`) are closed forms over those renders. So "each
reference image becomes its own faithful 3D asset" becomes numbers
(:mod:`stages.toyworld.fidelity`). What it models and what it does not: docs/TOYWORLD.md.
"""

from stages.toyworld.guidance import ToyWorldGuidance, nearest_object, reference_camera
from stages.toyworld.reference import ToyWorldReferenceSampler
from stages.toyworld.world import DEFAULT_WORLD, World, WorldError, load_world

__all__ = [
    "DEFAULT_WORLD",
    "ToyWorldGuidance",
    "ToyWorldReferenceSampler",
    "World",
    "WorldError",
    "load_world",
    "nearest_object",
    "reference_camera",
]
