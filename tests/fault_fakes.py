"""Faults injected through the fakes of ``pipeline_fakes``: a model that cannot be built, and a
disk that fills up at the checkpoint boundary. Ray workers get these by value."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import pipeline_fakes
from stages.models.sources import ModelSourceError

UNBUILDABLE = "models.sd: cannot load the Stable Diffusion pipeline 'nobody/no-such-model' from the Hugging Face hub"


def unbuildable_guidance():
    """A guidance factory whose model cannot load (what a bad ``models.sd`` does in the actor)."""
    raise ModelSourceError(UNBUILDABLE)


def disk_full_optimize(config, guidance, reference, seed, checkpoint_dir, prompt, asset_id, callback=None, *, flag: str, step_s: float = 0.0):
    """``fake_optimize`` whose checkpoint writes fail with ENOSPC while the file ``flag`` exists."""

    def checkpoint_boundary(step, metrics, previews):
        every = config.checkpoint_every
        if every and (step + 1) % every == 0 and Path(flag).exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(checkpoint_dir) / "fake.pt"))
        if callback is not None:
            callback(step, metrics, previews)

    return pipeline_fakes.fake_optimize(config, guidance, reference, seed, checkpoint_dir, prompt, asset_id, checkpoint_boundary, step_s=step_s)


def components(ip_guidance=None, optimize=None, step_s: float = 0.0):
    """``fake_components(reference=False)`` with the IP factory or the optimiser replaced."""
    base = pipeline_fakes.fake_components(step_s=step_s, reference=False)
    return type(base)(**{
        **base.__dict__,
        **({"ip_guidance": ip_guidance} if ip_guidance is not None else {}),
        **({"optimize": optimize} if optimize is not None else {}),
    })


def disk_full_components(flag: Path, step_s: float = 0.0):
    return components(optimize=functools.partial(disk_full_optimize, flag=str(flag), step_s=step_s))
