"""The evaluation report: means per prompt list, the Markdown table, and the files of
``<dataset>/evaluation/<run>/`` (summary.json, summary.md, diversity.csv)."""

from __future__ import annotations

import csv
import io
import json
import math
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

from pipeline.config import ConfigError
from pipeline.writer import DatasetWriter
from stages.asset_layout import REPORTS_DIR
from stages.atomic import atomic_write


def read_groups(groups: dict[str, str]) -> dict[str, set[str]]:
    """name → set of prompts of that list."""
    from pipeline.config import PromptsConfig, PromptSource
    from pipeline.prompts import read_prompts

    out = {}
    for name, path in groups.items():
        try:
            out[name] = set(read_prompts(PromptsConfig(sources=[PromptSource(path=path)])))
        except (ConfigError, OSError, ValueError) as error:
            raise ConfigError(f"config key 'groups.{name}': {error}") from None
    return out


def group_of(prompt: str, groups: dict[str, set[str]]) -> str:
    for name, prompts in groups.items():
        if prompt in prompts:
            return name
    return "other"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarise(scores: Sequence[dict[str, Any]], diversity: Sequence[Any], groups: dict[str, set[str]]) -> dict[str, dict[str, float]]:
    """Means per prompt list (plus ``all``): alignment, quality, diversity, assets, prompts."""
    names = [*groups, "other", "all"]
    table: dict[str, dict[str, float]] = {}
    for name in names:
        rows = [r for r in scores if name == "all" or group_of(r["prompt"], groups) == name]
        divs = [d for d in diversity if name == "all" or group_of(d.prompt, groups) == name]
        if not rows and name == "other":
            continue
        table[name] = {
            "alignment": _mean([r["alignment"] for r in rows]),
            "quality": _mean([r["quality"] for r in rows]),
            "diversity": _mean([d.diversity for d in divs]),
            "assets": float(len(rows)),
            "prompts": float(len({r["prompt"] for r in rows})),
        }
    return table


def summary_markdown(table: dict[str, dict[str, float]], header: str) -> str:
    """Metrics as rows, prompt lists as columns (the paper's Table 1 layout)."""
    columns = list(table)
    lines = [header, "", "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in ("alignment", "quality", "diversity", "assets", "prompts"):
        cells = []
        for c in columns:
            value = table[c][metric]
            cells.append("n/a" if not math.isfinite(value) else (f"{value:.0f}" if metric in ("assets", "prompts") else f"{value:.4f}"))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "alignment: 100 · mean cosine(CLIP view, prompt); quality: mean aesthetic-head score (n/a: no head);",
        "diversity: mean pairwise cosine distance of the variants' same-view CLIP features, per prompt, averaged.",
    ]
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """NaN / inf floats (also nested) as None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_text(writer: DatasetWriter, path: str, text: str) -> None:
    if writer.is_local:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    else:
        with writer.fs.open_output_stream(path) as stream:
            stream.write(text.encode())


def write_report(writer: DatasetWriter, markdown: str, payload: dict[str, Any], diversity: Sequence[Any], groups: dict[str, set[str]]) -> str:
    """``evaluation/<UTC time>-<8 hex>/``: ``summary.json`` (``payload``), ``summary.md``
    (``markdown``) and ``diversity.csv`` (one row per prompt and method); returns the directory."""
    report_dir = writer.path(REPORTS_DIR, f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
    writer.fs.create_dir(report_dir, recursive=True)
    _write_text(writer, f"{report_dir}/summary.json", json.dumps(json_safe(payload), indent=2) + "\n")
    _write_text(writer, f"{report_dir}/summary.md", markdown)
    buffer = io.StringIO()
    table = csv.writer(buffer)
    table.writerow(["prompt", "config_digest", "prompt_list", "variants", "diversity"])
    for d in diversity:
        table.writerow([d.prompt, d.method, group_of(d.prompt, groups), d.variants, d.diversity])
    _write_text(writer, f"{report_dir}/diversity.csv", buffer.getvalue())
    return report_dir
