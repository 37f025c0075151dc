"""Analytic teacher: a Gaussian-mixture "diffusion model" with exact ε-predictions.

Used by tests (the 3D optimiser with ``AnalyticGuidance``) and by ``python -m stages.toy2d``.
See :mod:`stages.teacher.model` for the exact model.
"""

from stages.teacher.guidance import AnalyticGuidance, reference_image, reference_points
from stages.teacher.mixture import GaussianMixture, alphas_cumprod
from stages.teacher.model import (
    AnalyticTeacher,
    TeacherConfig,
    prompt_mixture,
    reference_component,
    unconditional_mixture,
)

__all__ = [
    "AnalyticGuidance",
    "AnalyticTeacher",
    "GaussianMixture",
    "TeacherConfig",
    "alphas_cumprod",
    "prompt_mixture",
    "reference_component",
    "reference_image",
    "reference_points",
    "unconditional_mixture",
]
