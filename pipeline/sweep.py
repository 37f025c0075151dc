"""One dataset per value of a config key, each evaluated, and a comparison table.

    python -m pipeline.sweep configs/sweep_ip_scale.yaml [key=value ...]

Reads top to bottom: load the sweep YAML → build and validate every run's pipeline config
(``base`` + ``overrides`` + ``<key>=<value>`` + ``output=<output>/<name>_<value>``) before any
work → for each value: ``pipeline.run`` (resumes: committed assets are skipped) then
``pipeline.evaluate`` with that run's method → ``comparison.json`` / ``comparison.md`` in
``output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.evaluate import EvaluationRunConfig, evaluate_dataset, json_safe, load_evaluation_config
from pipeline.toyworld import toyworld_groups
from stages.config_loading import load_structured
from stages.atomic import atomic_write


@dataclass
class SweepConfig:
    base: str = "???"
    """Pipeline YAML every run starts from (relative to the sweep file)."""
    key: str = "method.isd.ip_scale"
    """Dotted pipeline-config key that is swept."""
    values: list[Any] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    """Dotlist overrides applied to every run (before the swept key)."""
    output: str = "outputs/sweep"
    """Each run writes its dataset to ``<output>/<last key part>_<value>``."""
    evaluate: Optional[str] = None
    """Evaluation YAML (relative to the sweep file); default settings when null."""
    evaluate_overrides: list[str] = field(default_factory=list)


@dataclass
class SweepRun:
    value: Any
    config: PipelineConfig


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Sweep YAML + dotlist onto :class:`SweepConfig`; relative paths made absolute."""
    path = Path(path)
    config: SweepConfig = load_structured(SweepConfig, path, overrides, what="sweep config")
    if not config.values:
        raise ConfigError(f"{path}: config key 'values' must list at least one value")
    absolute = lambda p: p if "://" in p or Path(p).is_absolute() else str((path.parent / p).resolve())  # noqa: E731
    config.base = absolute(config.base)
    if config.evaluate:
        config.evaluate = absolute(config.evaluate)
    return config


def run_name(key: str, value: Any) -> str:
    """``ip_scale_0.2``: the last part of the key and the value, file-name safe."""
    text = f"{key.rsplit('.', 1)[-1]}_{value}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def plan_sweep(config: SweepConfig) -> list[SweepRun]:
    """Every run's validated pipeline config; a bad key or value fails here, before any work."""
    from omegaconf import OmegaConf

    runs = []
    for value in config.values:
        output = "/".join([config.output.rstrip("/"), run_name(config.key, value)])
        try:
            pipeline_config = load_config(config.base, [*config.overrides, f"{config.key}={value}", f"output={output}"])
        except ConfigError as error:
            raise ConfigError(f"sweep key '{config.key}' = {value!r}: {error}") from None
        if OmegaConf.select(OmegaConf.structured(pipeline_config), config.key) is None:
            raise ConfigError(f"sweep key '{config.key}' is not a key of the pipeline config")
        runs.append(SweepRun(value, pipeline_config))
    return runs


def comparison_rows(key: str, results: Sequence[tuple[Any, str, Any]]) -> list[dict[str, Any]]:
    """One row per value: the ``all`` summary and each prompt list's alignment."""
    rows = []
    for value, output, evaluation in results:
        summary = evaluation.summary
        row: dict[str, Any] = {key: value, "output": output}
        row.update({name: summary["all"][name] for name in ("alignment", "quality", "diversity", "assets")})
        row.update({name: value for name, value in summary["all"].items() if name.startswith("toy_")})
        for group, values in summary.items():
            if group != "all":
                row[f"{group}/alignment"] = values["alignment"]
        rows.append(row)
    return rows


def comparison_markdown(key: str, rows: Sequence[dict[str, Any]]) -> str:
    columns = [c for c in rows[0] if c != "output"] if rows else [key]
    fmt = lambda v: "n/a" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Sweep over `{key}`", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c, math.nan)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def run_sweep(
    config: SweepConfig,
    run: Callable[[PipelineConfig], Any] | None = None,
    evaluation: EvaluationRunConfig | None = None,
    evaluator: Any | None = None,
    stream: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Run, evaluate and compare every value; returns the comparison rows.

    ``run`` defaults to :func:`pipeline.run.run_dataset`; ``evaluation`` to ``config.evaluate``.
    """
    stream = stream or sys.stderr
    if run is None:
        from pipeline.run import run_dataset as run
    runs = plan_sweep(config)
    evaluation = evaluation or load_evaluation_config(config.evaluate, config.evaluate_overrides)
    results = []
    for item in runs:
        print(f"[sweep] {config.key}={item.value} → {item.config.output}", file=stream, flush=True)
        run(item.config)
        scoring = evaluation
        if evaluation.toyworld == "auto" and toyworld_groups(item.config):  # score against the run's own world
            scoring = dataclasses.replace(evaluation, toyworld=item.config.models.toyworld)
        result = evaluate_dataset(item.config.output, scoring, evaluator=evaluator, method=item.config.method, stream=stream)
        results.append((item.value, item.config.output, result))
    rows = comparison_rows(config.key, results)
    out = Path(config.output)
    _write(out / "comparison.json", json.dumps(json_safe({"key": config.key, "rows": rows}), indent=2) + "\n")
    _write(out / "comparison.md", comparison_markdown(config.key, rows))
    print(comparison_markdown(config.key, rows), file=stream, flush=True)
    return rows


EXAMPLES = """examples:
  python -m pipeline.sweep configs/sweep_ip_scale.yaml                        # IP scale 0 / 0.2 / 0.5 / 0.7 / 1.0
  python -m pipeline.sweep configs/sweep_ip_scale.yaml 'values=[0.0,0.5]' output=outputs/ip_sweep_small
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="sweep YAML (configs/sweep_ip_scale.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides of the sweep config, e.g. 'values=[0,1]'")
    args = parser.parse_intermixed_args(argv)
    try:
        run_sweep(load_sweep_config(args.config, args.overrides))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
