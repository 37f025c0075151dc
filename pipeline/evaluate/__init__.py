"""Score a dataset: text alignment and quality per asset, diversity per prompt
(``python -m pipeline.evaluate``). The flow is :func:`pipeline.evaluate.run.evaluate_dataset`."""

from pipeline.evaluate.cli import main
from pipeline.evaluate.config import EvalTrackingConfig, EvaluationRunConfig, eval_digest, load_evaluation_config
from pipeline.evaluate.report import group_of, json_safe, read_groups, summarise, summary_markdown
from pipeline.evaluate.run import EvaluationResult, evaluate_dataset
from pipeline.evaluate.scores import SCORE_COLUMNS, SCORES_SCHEMA, TOY_COLUMNS, latest_scores, read_scores, write_scores
from pipeline.evaluate.toyworld import TOY_SUMMARY, toy_diversity, toy_scores, toyworld_of
from pipeline.evaluate.tracking import log_to_mlflow, method_from_run, mlflow_client, parent_runs

__all__ = [
    "SCORES_SCHEMA", "SCORE_COLUMNS", "TOY_COLUMNS", "TOY_SUMMARY", "EvalTrackingConfig", "EvaluationResult", "EvaluationRunConfig", "eval_digest",
    "evaluate_dataset", "group_of", "json_safe", "latest_scores", "load_evaluation_config", "log_to_mlflow", "main",
    "method_from_run", "mlflow_client", "parent_runs", "read_groups", "read_scores", "summarise", "summary_markdown",
    "toy_diversity", "toy_scores", "toyworld_of", "write_scores",
]
