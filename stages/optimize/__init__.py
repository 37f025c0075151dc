"""Per-asset optimisation: config, loop, checkpoints (``python -m stages.optimize`` is the CLI)."""

from stages.optimize.config import OptimizeConfig, load_optimize_config
from stages.optimize.loop import OptimizeResult, optimize_asset

__all__ = ["OptimizeConfig", "OptimizeResult", "load_optimize_config", "optimize_asset"]
