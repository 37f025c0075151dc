"""The paper's claims measured in 3D in the toy world (NeRF and splats): ``python -m benchmarks.toyworld``.

Every run optimises one asset in-process with the quickstart's method (``configs/quickstart.yaml``:
the toy world's models, tiny NeRF, 150 iterations) plus the row's overrides, then scores it from
held-out views against the prompt's known objects (:mod:`stages.toyworld.fidelity`). Rows:

- ``oracle``: multi-view reconstruction of the reference object (the renders themselves as
  targets): what the scene and the schedule can reach at best;
- ``isd``: the paper's loss, α·ISD + β·SDS-MVD (Eq. 7 + Eq. 8, SDS form; the quickstart);
- ``isd_recon``: the same with MVDream-threestudio's x0-reconstruction form of the MVD term;
- ``sds``: plain SDS at CFG 7.5 (+ β·SDS-MVD), one asset per optimiser seed (references unused):
  how many distinct objects across seeds;
- ``ip_sds``: IP-SDS (+ β·SDS-MVD) = Table 3's "Rand. noise (CFG 7.5)";
- ``isd_no_mvd``: α·ISD alone (multi-view term off): consistency across views;
- Table 3's other rows ``cv_random_cfg100``, ``cv_t_delta_sd`` and the extra ablations
  ``cv_t_delta_ip``, ``cv_sd_cfg100``, ``cv_independent_noise`` (NeRF);
- ``ip_scale_<s>``: ``isd`` at IP scale s = 0.2, 0.7, 1.0 (the sweep; 0.5 is ``isd``) (NeRF).

Plus the gradient variance of ISD against IP-SDS per t on fixed renders (the variance identity
Var ISD = Var A + Var B − 2 Cov(A, B) of the analytic teacher) and the distances of the initial
scene to the prompts' objects. Runs append to ``--runs`` (JSON lines; a rerun skips finished
runs), the summary goes to ``--out`` (JSON, tracked: ``benchmarks/results/toyworld.json``) and
``--markdown``. The wall time and load of the runs themselves are kept per runs file
(``<runs>.meta.json``), so a rerun that only re-summarises reports when and how they were measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TABLE3 = ("ip_sds", "cv_random_cfg100", "cv_t_delta_sd", "isd")
EXTRA_ABLATIONS = ("cv_t_delta_ip", "cv_sd_cfg100", "cv_independent_noise")
SPLAT_OVERRIDES = ("method.representation=splats",)
"""The quickstart's ``splats:`` section already holds the toy world's white background."""
PSNR_THRESHOLD = 20.0
"""Iterations-to-threshold: the first preview (every ``PREVIEW_EVERY`` iterations) whose PSNR to
the reference's object reaches this many dB."""
PREVIEW_EVERY = 10


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...] = ()
    oracle: bool = False
    seeds_only: bool = False
    """The row ignores references: one asset per optimiser seed (SDS)."""


def rows_for(representation: str, quick: bool = False) -> list[Row]:
    """The rows of one representation, most important first (the runs go in this order)."""
    rows = [
        Row("isd"),
        Row("sds", ("method.loss=sds",), seeds_only=True),
        Row("ip_sds", ("method.loss=ip_sds",)),
        Row("isd_no_mvd", ("method.mvd.enabled=false",)),
        Row("isd_recon", ("method.mvd.recon_loss=true",)),
        Row("oracle", oracle=True),
    ]
    if representation == "nerf" and not quick:
        rows += [Row(name, (f"method.loss={name}",)) for name in ("cv_random_cfg100", "cv_t_delta_sd")]
        rows += [Row(f"ip_scale_{s}", (f"method.isd.ip_scale={s}",)) for s in (0.2, 1.0)]
        rows += [Row(name, (f"method.loss={name}",)) for name in EXTRA_ABLATIONS]
        rows += [Row("ip_scale_0.7", ("method.isd.ip_scale=0.7",))]
    return rows


@dataclass(frozen=True)
class Job:
    representation: str
    row: Row
    prompt: str
    reference: int
    seed: int
    iterations: int
    world: str

    @property
    def key(self) -> str:
        return f"{self.representation}/{self.row.name}/{self.prompt}/{self.reference}/{self.seed}/{self.iterations}"


def method_for(job: Job) -> Any:
    from pipeline.config import load_config

    overrides = [f"method.iterations={job.iterations}", f"models.toyworld={job.world}", "method.checkpoint_every=0"]
    if job.representation == "splats":
        overrides += list(SPLAT_OVERRIDES)
    overrides += list(job.row.overrides)
    if job.row.oracle:
        overrides.append("method.loss=mvdream")
    return load_config(QUICKSTART, overrides).method


def run_job(job: Job) -> dict[str, Any]:
    """Optimise and score one asset (runs in a worker process, one torch thread)."""
    import torch

    torch.set_num_threads(1)
    from stages.guidance.image_target import ImageTargetGuidance
    from stages.guidance.set import GuidanceSet
    from stages.optimize.loop import optimize_asset
    from stages.scene.cameras import preview_cameras
    from stages.toyworld import ToyWorldGuidance, ToyWorldReferenceSampler, load_world
    from stages.toyworld.fidelity import psnr, score_scene
    from stages.toyworld.render import render_objects

    world = load_world(job.world)
    method = method_for(job)
    method.preview_every, method.preview_resolution = PREVIEW_EVERY, 32
    table = world.prompt_table(job.prompt).select(torch.tensor([job.reference]))
    reference = ToyWorldReferenceSampler(world).render(job.prompt, job.reference)
    if job.row.oracle:
        target = lambda cams, h, w: render_objects(table, cams.c2w, cams.fovy, h, w, world.shading, 1).rgb[0]  # noqa: E731
        guidance = GuidanceSet(mvd=ImageTargetGuidance(target))
    else:
        g = ToyWorldGuidance(world)
        guidance = GuidanceSet(ip=g if method.uses_ip else None, mvd=g if method.uses_mvd else None)
    cams = preview_cameras(method.cameras)
    truth = render_objects(table, cams.c2w, cams.fovy, 32, 32, world.shading, 2).rgb[0]
    curve: list[tuple[int, float]] = []

    def callback(step: int, metrics: dict[str, float], previews: Any) -> None:
        if previews is not None:
            curve.append((step + 1, float(psnr(previews, truth, dims=(0, 1, 2, 3)))))

    with tempfile.TemporaryDirectory() as work:
        began = time.perf_counter()
        uses_ref = job.row.oracle or not job.row.seeds_only
        result = optimize_asset(
            method, guidance, reference if uses_ref else None, job.seed, work, job.prompt, f"bench-{job.seed}", callback
        )
        seconds = time.perf_counter() - began
    fidelity = score_scene(
        result.scene, world, job.prompt, reference, mesh_resolution=method.export.mesh_resolution,
        mesh_threshold=_threshold(method.export.mesh_threshold),
    )
    reached = next((step for step, value in curve if value >= PSNR_THRESHOLD), None)
    history = result.history
    mean = lambda key: statistics.fmean(h[key] for h in history if key in h) if any(key in h for h in history) else math.nan  # noqa: E731
    return {
        "key": job.key, "representation": job.representation, "row": job.row.name, "prompt": job.prompt,
        "reference": job.reference, "seed": job.seed, "iterations": job.iterations, "seconds": seconds,
        **fidelity.to_dict(), "iterations_to_threshold": reached, "psnr_curve": curve,
        "grad_norm_ip": mean("grad_norm_ip"), "grad_norm_mvd": mean("grad_norm_mvd"),
    }


def _threshold(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def plan(representations: Sequence[str], references: Sequence[int], seeds: int, iterations: int, world: str, quick: bool) -> list[Job]:
    from stages.toyworld import load_world

    prompts = list(load_world(world).prompts)
    if quick:
        prompts = prompts[:1]
    jobs = []
    for representation in representations:
        for row in rows_for(representation, quick):
            for prompt in prompts:
                if row.seeds_only:
                    runs = [Job(representation, row, prompt, references[0], 1000 + s, iterations, world) for s in range(seeds)]
                else:
                    runs = [Job(representation, row, prompt, ref, 0, iterations, world) for ref in references]
                jobs += runs
    # the most important rows first, so a run cut short still answers them
    return sorted(jobs, key=lambda job: _priority(job.representation, job.row.name))


PRIORITY = [
    *((rep, row) for row in ("isd", "sds", "ip_sds", "isd_no_mvd") for rep in ("nerf", "splats")),
    *(("nerf", row) for row in ("isd_recon", "oracle", "cv_random_cfg100", "cv_t_delta_sd", "ip_scale_0.2", "ip_scale_1.0")),
    ("splats", "isd_recon"), ("splats", "oracle"),
    *(("nerf", row) for row in (*EXTRA_ABLATIONS, "ip_scale_0.7")),
]
"""Order of the runs (representation, row)."""


def _priority(representation: str, row: str) -> int:
    return PRIORITY.index((representation, row)) if (representation, row) in PRIORITY else len(PRIORITY)


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    runs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs[record["key"]] = record
    return runs


# ------------------------------------------------------------------ fixed-render statistics
def gradient_variance(world_name: str, timesteps: Sequence[int], draws: int, ip_scale: float = 0.5) -> list[dict[str, Any]]:
    """Var of the IP-side gradient over noise draws, IP-SDS (A) vs SDS (B) vs ISD (= A − B), at
    fixed renders: the world's start blob and each prompt's object 5 seen from 4 cameras."""
    import torch

    from stages.guidance.protocol import GuidanceRequest, IPSettings
    from stages.scene.cameras import CameraConfig, sample_cameras
    from stages.toyworld import ToyWorldGuidance, ToyWorldReferenceSampler, load_world
    from stages.toyworld.render import render_objects
    from stages.toyworld.world import ToyObject, primitive_table

    world = load_world(world_name)
    guidance = ToyWorldGuidance(world)
    sampler = ToyWorldReferenceSampler(world)
    cams = sample_cameras(torch.Generator().manual_seed(0), 4, CameraConfig())
    start = render_objects(primitive_table([ToyObject("start", (world.start,))]), cams.c2w, cams.fovy, 32, 32, world.shading).rgb[0]
    rows = []
    losses = ("ip_sds", "sds", "isd")
    for prompt in world.prompts:
        reference = sampler.render(prompt, 5)
        for name in losses:  # one registration per loss: the loss is an asset's setting
            guidance.register(f"{prompt}/{name}", prompt, reference, IPSettings(loss=name, ip_scale=ip_scale))
        obj = render_objects(world.prompt_table(prompt).select(torch.tensor([5])), cams.c2w, cams.fovy, 32, 32, world.shading).rgb[0]
        for state, rgb in (("start", start), ("reference", obj)):
            for t in timesteps:
                grads = {name: [] for name in losses}
                for seed in range(draws):
                    for name in grads:
                        request = GuidanceRequest(
                            f"{prompt}/{name}", rgb, torch.full((4,), int(t)), seed, c2w=cams.c2w, fovy=cams.fovy
                        )
                        grads[name].append(guidance.grad([request])[0].grad_rgb.double().flatten())
                a, b, d = (torch.stack(grads[n]) for n in ("ip_sds", "sds", "isd"))
                var = lambda x: float(x.var(0).sum())  # noqa: E731
                cov = float(((a - a.mean(0)) * (b - b.mean(0))).sum(0).sum() / (draws - 1))
                var_a, var_b, var_d = var(a), var(b), var(d)
                corr = cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan
                rows.append({
                    "prompt": prompt, "state": state, "t": int(t), "var_ip_sds": var_a, "var_sds": var_b,
                    "var_isd": var_d, "identity_gap": var_d - (var_a + var_b - 2 * cov), "corr": corr,
                    "corr_threshold": 0.5 * math.sqrt(var_b / var_a) if var_a > 0 else math.nan,
                    "isd_lower": var_d < var_a,
                })
    return rows


def start_distances(world_name: str, representations: Sequence[str]) -> list[dict[str, Any]]:
    """Held-out PSNR of each representation's initial scene to every object of every prompt."""
    import torch

    from stages.scene.factory import build_scene
    from stages.toyworld import load_world
    from stages.toyworld.fidelity import score_scene

    world = load_world(world_name)
    out = []
    for representation in representations:
        job = Job(representation, Row("isd"), next(iter(world.prompts)), 0, 0, 150, world_name)
        scene = build_scene(method_for(job), 0).eval()
        for prompt in world.prompts:
            with torch.no_grad():
                scores = score_scene(scene, world, prompt)
            out.append({
                "representation": representation, "prompt": prompt, "psnr_objects": scores.psnr_objects,
                "to_dominant": scores.psnr_objects[0], "nearest": scores.identity,
            })
    return out


# ------------------------------------------------------------------ summary
def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (representation, row)."""
    table = []
    keys = sorted({(r["representation"], r["row"]) for r in runs}, key=lambda k: (k[0], _row_order(k[1])))
    for representation, row in keys:
        rs = [r for r in runs if r["representation"] == representation and r["row"] == row]
        by_prompt: dict[str, set[int]] = {}
        for r in rs:
            by_prompt.setdefault(r["prompt"], set()).add(r["identity"])
        reached = [r["iterations_to_threshold"] for r in rs if r["iterations_to_threshold"] is not None]
        table.append({
            "representation": representation, "row": row, "assets": len(rs),
            "recovered": sum(bool(r["identity_correct"]) for r in rs) / len(rs),
            "psnr_reference": statistics.fmean(r["psnr_reference"] for r in rs),
            "psnr_identity": statistics.fmean(r["psnr_identity"] for r in rs),
            "consistency": statistics.fmean(r["consistency"] for r in rs),
            "iou": _mean([r["iou"] for r in rs]),
            "distinct_per_prompt": statistics.fmean(len(v) for v in by_prompt.values()),
            "dominant_share": sum(r["identity"] == 0 for r in rs) / len(rs),
            "reached_threshold": len(reached) / len(rs),
            "median_iterations_to_threshold": statistics.median(reached) if reached else None,
            "seconds": statistics.fmean(r["seconds"] for r in rs),
        })
    return table


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


_ORDER = ["oracle", "isd", "isd_recon", "sds", "ip_sds", "isd_no_mvd", "cv_random_cfg100", "cv_t_delta_sd", *EXTRA_ABLATIONS,
          "ip_scale_0.2", "ip_scale_0.7", "ip_scale_1.0"]


def _row_order(name: str) -> tuple[int, str]:
    return (_ORDER.index(name), "") if name in _ORDER else (len(_ORDER), name)


def markdown(summary: list[dict[str, Any]], variance: list[dict[str, Any]], starts: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def f(value: Any, digits: int = 2) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    runs = meta["runs"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; the invocation that finished the optimisation runs ({runs['new_runs']} of them) "
        f"took {runs['wall_s']:.0f} s wall (finished {runs['finished']}), load average {runs['load_before']} before, {runs['load_after']} after, "
        f"{runs['workers']} worker processes, 1 torch thread each; this summary: {meta['wall_s']:.0f} s, "
        f"load {meta['load_before']} before, {meta['load_after']} after.",
        "",
        "| repr | row | assets | recovered | PSNR to ref (dB) | PSNR to identity | consistency | IoU | distinct / prompt | → object 0 | ≥ "
        f"{PSNR_THRESHOLD:.0f} dB | median its to {PSNR_THRESHOLD:.0f} dB | s / asset |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['representation']} | {r['row']} | {r['assets']} | {r['recovered']:.0%} | {f(r['psnr_reference'])} | "
            f"{f(r['psnr_identity'])} | {f(r['consistency'])} | {f(r['iou'])} | {f(r['distinct_per_prompt'])} | {r['dominant_share']:.0%} | "
            f"{r['reached_threshold']:.0%} | {f(r['median_iterations_to_threshold'], 0)} | {f(r['seconds'], 1)} |"
        )
    if variance:
        lines += ["", "Gradient variance over noise draws (sum of per-element variances, IP-side grad_rgb), mean over prompts:", "",
                  "| renders | t | Var IP-SDS | Var SDS | Var ISD | corr(A,B) | ½·sd B/sd A | ISD < IP-SDS | identity gap |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for state in ("start", "reference"):
            for t in sorted({v["t"] for v in variance}):
                vs = [v for v in variance if v["state"] == state and v["t"] == t]
                if not vs:
                    continue
                m = lambda k: statistics.fmean(v[k] for v in vs)  # noqa: E731
                lines.append(
                    f"| {state} | {t} | {m('var_ip_sds'):.4g} | {m('var_sds'):.4g} | {m('var_isd'):.4g} | {m('corr'):.3f} | "
                    f"{m('corr_threshold'):.3f} | {sum(v['isd_lower'] for v in vs)}/{len(vs)} | {max(abs(v['identity_gap']) for v in vs):.2g} |"
                )
    if starts:
        lines += ["", "Initial scene vs the objects (held-out PSNR, dB): to the dominant object 0, to the nearest, and the range:", "",
                  "| repr | prompt | to object 0 | nearest object | its PSNR | lowest |", "|---|---|---|---|---|---|"]
        for s in starts:
            lines.append(
                f"| {s['representation']} | {s['prompt']} | {s['to_dominant']:.2f} | {s['nearest']} | "
                f"{max(s['psnr_objects']):.2f} | {min(s['psnr_objects']):.2f} |"
            )
    return "\n".join(lines) + "\n"


def _runs_meta(runs_path: Path, todo: list[Job], load_before: float, seconds: float, workers: int) -> dict[str, Any]:
    """Wall time and load of the optimisation runs: this invocation's when it ran any, else the
    record left by the invocation that did (``<runs>.meta.json``)."""
    meta_path = runs_path.with_suffix(".meta.json")
    if not todo and meta_path.is_file():
        return json.loads(meta_path.read_text())
    meta = {"new_runs": len(todo), "wall_s": seconds, "workers": workers, "load_before": f"{load_before:.1f}",
            "load_after": f"{os.getloadavg()[0]:.1f}", "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if todo:
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toyworld", description=__doc__.splitlines()[0])
    parser.add_argument("--representations", nargs="+", default=["nerf", "splats"], choices=["nerf", "splats"])
    parser.add_argument("--references", default="2,6", help="object indices used as references in every prompt")
    parser.add_argument("--seeds", type=int, default=3, help="optimiser seeds per prompt of the sds row")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--world", default="default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--draws", type=int, default=32, help="noise draws per t of the variance table (0: skip)")
    parser.add_argument("--quick", action="store_true", help="one prompt, the main rows only (tests)")
    parser.add_argument("--runs", default=str(REPO / "benchmarks" / "out" / "toyworld_runs.jsonl"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "toyworld.json"))
    parser.add_argument("--markdown", default=str(REPO / "benchmarks" / "out" / "toyworld.md"))
    args = parser.parse_args(argv)
    from benchmarks.common import environment, write_json

    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    references = [int(r) for r in args.references.split(",")]
    jobs = plan(args.representations, references, args.seeds, args.iterations, args.world, args.quick)
    runs_path = Path(args.runs)
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_runs(runs_path)
    todo = [job for job in jobs if job.key not in done]
    print(f"[toyworld] {len(jobs)} runs, {len(jobs) - len(todo)} already in {runs_path}, {len(todo)} to run", file=sys.stderr, flush=True)
    import multiprocessing

    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        for index, record in enumerate(pool.map(run_job, todo), start=1):
            with runs_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            done[record["key"]] = record
            print(
                f"[toyworld] {index}/{len(todo)} {record['key']}: identity {record['identity']} "
                f"(ref {record['reference']}) {record['psnr_reference']:.1f} dB, {record['seconds']:.0f} s",
                file=sys.stderr, flush=True,
            )
    runs = [done[job.key] for job in jobs]
    runs_meta = _runs_meta(runs_path, todo, load_before, time.perf_counter() - began, args.workers)
    timesteps = (100, 300, 500, 700, 900)
    variance = gradient_variance(args.world, timesteps, args.draws) if args.draws else []
    starts = start_distances(args.world, args.representations)
    summary = summarise(runs)
    wall = time.perf_counter() - began
    meta = {
        "command": "python -m benchmarks.toyworld " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores (shared)", "workers": args.workers, "wall_s": wall,
        "load_before": f"{load_before:.1f}", "load_after": f"{os.getloadavg()[0]:.1f}",
        "environment": environment("cpu"), "psnr_threshold": PSNR_THRESHOLD, "references": references,
        "runs": runs_meta,
    }
    result = {"meta": meta, "summary": summary, "variance": variance, "start_distances": starts, "runs": runs}
    write_json(result, args.out)
    text = markdown(summary, variance, starts, meta)
    Path(args.markdown).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
