"""The evaluation config (``configs/evaluate.yaml``) and the digest of the settings that change a score."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.config import ConfigError
from stages.digest import digest
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.render import ViewSource


@dataclass
class EvalTrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None
    """MLflow URI; default the dataset's own (``sqlite:///<dataset>/mlflow.db``)."""
    experiment: str = "modedreamer-evaluation"
    """Experiment of the new run made when the dataset's parent run is not recorded."""


@dataclass
class EvaluationRunConfig:
    """``configs/evaluate.yaml``."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dataset_config: Optional[str] = None
    """The pipeline YAML the dataset was made with (relative to this file): its ``method``
    rebuilds each scene from ``checkpoint.pt``. Without it (and without ``method.yaml`` in the
    asset dirs) the views are cut from ``preview.png``."""
    dataset_overrides: list[str] = field(default_factory=list)
    """Dotlist overrides the dataset was made with (e.g. ``method.iterations=3000``)."""
    views: ViewSource = ViewSource.auto
    """``auto``: render when the method config is known, else cut the views from ``preview.png``."""
    groups: dict[str, str] = field(default_factory=dict)
    """Prompt lists for the summary columns: name → prompt file (txt/jsonl/...; relative to this
    file). A prompt in none of them counts as ``other``."""
    skip_scored: bool = True
    """Keep an asset's latest score when it was made with the same evaluation settings."""
    method_from_mlflow: bool = True
    """Without ``dataset_config``: rebuild scenes from the ``config.yaml`` the pipeline logged on
    the dataset's parent MLflow run (found through each asset's child run)."""
    toyworld: str = "auto"
    """Score against a toy world's known objects: ``auto`` (when ``dataset_config``'s models are the
    toy world, with its ``models.toyworld``), ``none``, or a world (``default`` / a world YAML)."""
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)


def load_evaluation_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvaluationRunConfig:
    """YAML (optional) + dotlist onto :class:`EvaluationRunConfig`; paths made absolute."""
    from stages.config_loading import load_structured

    base_dir = Path.cwd() if path is None else Path(path).parent
    config: EvaluationRunConfig = load_structured(EvaluationRunConfig, path, overrides, what="evaluation config")
    try:
        config.evaluate.validate()
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    absolute = lambda p: p if "://" in p or Path(p).is_absolute() else str((base_dir / p).resolve())  # noqa: E731
    if config.dataset_config:
        config.dataset_config = absolute(config.dataset_config)
    config.groups = {name: absolute(p) for name, p in config.groups.items()}
    return config


def eval_digest(config: EvaluateConfig, views: str, world: Any | None = None) -> str:
    """12 hex digits over the settings that change a score (and the toy world scored against)."""
    payload = {k: v for k, v in asdict(config).items() if k != "device"}
    payload["views"] = views
    if world is not None:
        payload["toyworld"] = world.digest()
    return digest(payload, 12, compact=False)
