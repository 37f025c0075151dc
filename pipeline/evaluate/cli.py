"""``python -m pipeline.evaluate``: the command line of :func:`pipeline.evaluate.run.evaluate_dataset`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import ConfigError
from pipeline.evaluate.config import load_evaluation_config
from pipeline.evaluate.run import evaluate_dataset

EXAMPLES = """examples:
  python -m pipeline.evaluate outputs/t3bench_single --config configs/evaluate.yaml
  python -m pipeline.evaluate outputs/quickstart --config configs/evaluate.yaml evaluate.clip=tiny evaluate.aesthetic_head=tiny
  python -m pipeline.evaluate outputs/t3bench --config configs/evaluate.yaml --dataset-config configs/eval_t3bench.yaml
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description="Score a dataset: text alignment and quality per asset, diversity per prompt.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help="dataset root (the pipeline's output)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. evaluate.clip=tiny views=preview")
    parser.add_argument("--config", default=None, help="evaluation YAML (configs/evaluate.yaml)")
    parser.add_argument("--dataset-config", default=None, help="pipeline YAML the dataset was made with (overrides dataset_config)")
    parser.add_argument(
        "--dataset-override", action="append", default=[], metavar="KEY=VALUE",
        help="a dotlist override the dataset was made with (repeatable), e.g. method.iterations=3000",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_evaluation_config(args.config, args.overrides)
        if args.dataset_config:
            config.dataset_config = str(Path(args.dataset_config).resolve())
        config.dataset_overrides = [*config.dataset_overrides, *args.dataset_override]
        result = evaluate_dataset(args.dataset, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"[evaluate] {result.scored} scored, {result.reused} reused, {result.failed} failed; "
        f"scores: {result.scores_path}; report: {result.report_dir}",
        file=sys.stderr,
    )
    return 1 if result.failed and not (result.scored or result.reused) else 0
