"""Densify/prune with gsplat's ``DefaultStrategy`` driven from one shared Adam optimiser.

gsplat's strategies expect ``optimizers: dict[name, Optimizer]`` with exactly one param group
each. The project's loop builds a single ``torch.optim.Adam(scene.param_groups(lr))`` instead,
whose groups carry a ``name``. :class:`GroupView` presents one named group of that optimiser as
the single-group optimiser gsplat expects; gsplat's ops then replace the group's parameter and
move its Adam moments in the shared optimiser itself. The strategy code runs unchanged on
CPU and CUDA; it needs the rasteriser's ``means2d`` (with retained grad), ``radii`` (C, N, 2),
``width``, ``height``, ``n_cameras`` which both backends provide.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import DensifyConfig

STRATEGY_FIELDS = (
    "prune_opa",
    "grow_grad2d",
    "grow_scale3d",
    "grow_scale2d",
    "prune_scale3d",
    "prune_scale2d",
    "refine_scale2d_stop_iter",
    "refine_start_iter",
    "refine_stop_iter",
    "reset_every",
    "refine_every",
    "pause_refine_after_reset",
    "revised_opacity",
)


class GroupView:
    """One param group of a shared optimiser seen as a single-group optimiser (gsplat's view)."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]):
        self.param_groups = [group]
        self.state = optimizer.state


def make_strategy(config: DensifyConfig):
    """gsplat ``DefaultStrategy`` with the fields of ``config`` (raises ImportError without gsplat)."""
    from gsplat.strategy import DefaultStrategy

    return DefaultStrategy(**{name: getattr(config, name) for name in STRATEGY_FIELDS})


def group_views(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, GroupView]:
    """Views of the groups called ``names`` in ``optimizer`` (built from ``SplatScene.param_groups``)."""
    by_name = {group.get("name"): group for group in optimizer.param_groups}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(
            f"optimizer has no param group named {missing}; build it from SplatScene.param_groups(lr) "
            "(or SplatScene.make_optimizer) so densification can resize the Gaussian parameters"
        )
    views = {}
    for name in names:
        if len(by_name[name]["params"]) != 1:
            raise ValueError(f"optimizer param group {name!r} must hold exactly one tensor")
        views[name] = GroupView(optimizer, by_name[name])
    return views


def without_growth(strategy):
    """The same strategy with cloning/splitting switched off (pruning still runs)."""
    return dataclasses.replace(strategy, grow_grad2d=float("inf"), refine_scale2d_stop_iter=0)
