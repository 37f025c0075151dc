"""Evaluation scores on the gallery's cards: the latest succeeded score of each asset and, for a
toy-world dataset, a verdict a newcomer reads at a glance (did the asset become its reference's
object, how close from views it never trained on) and one line over the page."""

from __future__ import annotations

import math
from typing import Any

from pipeline.evaluate.scores import read_scores
from pipeline.gallery.records import AssetRecord
from pipeline.writer import DatasetWriter
from stages.toyworld.fidelity import FAITHFUL_PSNR  # the verdict's threshold lives with the scores

SCORE_FIELDS = ("alignment", "quality", "toy_identity", "toy_reference", "toy_identity_correct",
                "toy_psnr_reference", "toy_consistency", "toy_iou")
"""Evaluation scores the gallery shows (``pipeline.evaluate`` writes them)."""


def latest_scores(writer: DatasetWriter) -> dict[str, dict[str, Any]]:
    """asset_id → its latest succeeded score row (the fields of :data:`SCORE_FIELDS` that are set)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in read_scores(writer):  # oldest first
        if row.get("status") == "succeeded":
            values = {k: row[k] for k in SCORE_FIELDS if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
            latest[str(row["asset_id"])] = values
    return latest


def verdict(scores: dict[str, Any]) -> dict[str, str] | None:
    """One line a newcomer reads at a glance: did the toy-world asset become its reference's
    object. ``{"kind": ok|weak|bad|neutral, "text": ...}``, or None without toy-world scores."""
    if "toy_identity" not in scores:
        return None
    identity = int(scores["toy_identity"])
    details = []
    if "toy_psnr_reference" in scores:
        details.append(f"{scores['toy_psnr_reference']:.1f} dB from new views")
    if "toy_consistency" in scores:
        details.append(f"views agree {scores['toy_consistency']:.0%}")
    if "toy_iou" in scores:
        details.append(f"mesh IoU {scores['toy_iou']:.2f}")
    if "toy_reference" not in scores:
        head, kind = f"became object {identity}", "neutral"
    elif not scores.get("toy_identity_correct"):
        head, kind = f"\u2717 became object {identity}; the reference shows object {int(scores['toy_reference'])}", "bad"
    elif scores.get("toy_psnr_reference", 0.0) >= FAITHFUL_PSNR:
        head, kind = f"\u2713 became its reference's object ({identity})", "ok"
    else:
        head, kind = f"\u2248 nearest to its reference's object ({identity}) but below {FAITHFUL_PSNR:.0f} dB", "weak"
    return {"kind": kind, "text": " \u00b7 ".join([head, *details])}


def toy_summary(records: list[AssetRecord]) -> str:
    """The page's one line over the toy-world verdicts (HTML, escaped), or ''."""
    toy = [r.scores for r in records if "toy_identity_correct" in r.scores]
    if not toy:
        return ""
    recovered = sum(bool(s["toy_identity_correct"]) for s in toy)
    faithful = sum(bool(s["toy_identity_correct"]) and s.get("toy_psnr_reference", 0.0) >= FAITHFUL_PSNR for s in toy)
    psnrs = [s["toy_psnr_reference"] for s in toy if "toy_psnr_reference" in s]
    mean_psnr = f"; mean {sum(psnrs) / len(psnrs):.1f} dB to it from new views" if psnrs else ""
    return (
        f'<p class="summary verdict {"ok" if faithful == len(toy) else "weak"}">Toy world: {recovered} of {len(toy)} scored '
        f"assets became their reference's object, {faithful} faithfully (&ge; {FAITHFUL_PSNR:.0f} dB){mean_psnr}.</p>"
    )
