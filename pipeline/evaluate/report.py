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
from pipeline.evaluate.toyworld import TOY_SUMMARY, toy_diversity
from pipeline.writer import DatasetWriter
from stages.asset_layout import REPORTS_DIR
from stages.atomic import atomic_write


def read_groups(groups: dict[str, str]) -> dict[str, set[str]]:
    """name → set of prompts of that list."""
    from pipeline.prompts import PromptsConfig, PromptSource, read_prompts

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
    """Means per prompt list (plus ``all``): alignment, quality, diversity, assets, prompts; and
    for toy-world scores: recovered fraction, PSNR to the reference, consistency, IoU, distinct
    objects per prompt."""
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
        toy = [r for r in rows if r.get("toy_identity") is not None]
        if toy:
            table[name].update({
                "toy_recovered": _mean([r.get("toy_identity_correct") for r in toy]),
                "toy_psnr_reference": _mean([r.get("toy_psnr_reference") for r in toy]),
                "toy_consistency": _mean([r.get("toy_consistency") for r in toy]),
                "toy_iou": _mean([r.get("toy_iou") for r in toy]),
                "toy_distinct": _mean([float(d["distinct"]) for d in toy_diversity(toy)]),
            })
    return table


def summary_markdown(table: dict[str, dict[str, float]], header: str) -> str:
    """Metrics as rows, prompt lists as columns (the paper's Table 1 layout)."""
    columns = list(table)
    lines = [header, "", "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    toy = [m for m in TOY_SUMMARY if any(m in table[c] for c in columns)]
    for metric in ("alignment", "quality", "diversity", "assets", "prompts", *toy):
        cells = []
        for c in columns:
            value = table[c].get(metric, math.nan)
            cells.append("n/a" if not math.isfinite(value) else (f"{value:.0f}" if metric in ("assets", "prompts") else f"{value:.4f}"))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "alignment: 100 · mean cosine(CLIP view, prompt); quality: mean aesthetic-head score (n/a: no head);",
        "diversity: mean pairwise cosine distance of the variants' same-view CLIP features, per prompt, averaged.",
    ]
    if toy:
        lines.append(
            "toy world (held-out views against the prompt's known objects): toy_recovered = fraction whose nearest object is "
            "the reference's; toy_psnr_reference = dB to it; toy_consistency = fraction of views agreeing; toy_iou = mesh "
            "solid vs the object's voxels; toy_distinct = distinct objects per prompt."
        )
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
