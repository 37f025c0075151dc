"""The paper's Fig. 3 in miniature, on a 2D Gaussian mixture with the analytic teacher.

    python -m stages.toy2d [--out DIR] [--draws N] [--seeds N] [--steps N]

Writes ``DIR/toy2d.png`` (gradient variance and norm per t for SDS, IP-SDS and ISD; final
points of each method over the prompt's density), ``DIR/toy2d.json`` and ``DIR/toy2d.md``
(variance, covariance, correlation and SNR per t and tilt; where each method's points end).

Setting: the prompt's mixture has four modes on a circle (weights ∝ 0.6^k, so mode 0
dominates); the unconditional branch is a broad Gaussian; a reference picks one mode and
tilts the IP branch toward it (``stages.teacher.model``). With A = w·(ε_IP^cfg − ε) (IP-SDS)
and B = w·(ε_SD^cfg − ε) (SDS), ISD = A − B, so Var ISD = Var A + Var B − 2 Cov(A, B):
ISD has less variance than IP-SDS exactly when corr(A, B) > ½·sd B / sd A, and less than
SDS exactly when corr(A, B) > ½·sd A / sd B.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from stages.guidance import losses
from stages.optimize.schedules import loss_weights, sample_timesteps, timestep_range
from stages.teacher.mixture import GaussianMixture
from stages.teacher.model import AnalyticTeacher

METHODS = ("sds", "ip_sds", "isd", "isd_sds")
"""Optimised methods: SDS, IP-SDS, ISD, and α·ISD + β·SDS (α 0.4→0.8, β 0.6→0.02)."""


@dataclass
class ToyConfig:
    """The 2D setting (documented defaults; see module docstring)."""

    radius: float = 0.6
    """Modes sit on a circle of this radius (data box is [−1, 1]²)."""
    component_std: float = 0.1
    weight_ratio: float = 0.6
    """π_k ∝ weight_ratio^k."""
    uncond_std: float = 0.6
    tilt: float = 4.0
    """Reference tilt τ per unit IP scale (the optimisation runs use this one)."""
    tilts: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    """Tilts of the variance table."""
    null_flatten: float = 0.3
    ip_scale: float = 0.5
    guidance_scale: float = 7.5
    timesteps: list[int] = field(default_factory=lambda: [50, 200, 400, 600, 800, 950])
    """t of the variance table."""
    draws: int = 1000
    """Noise draws per point and t for the variance table."""
    points: int = 8
    """Clean points x0 (drawn from the prompt's mixture) the variance is averaged over."""
    seeds: int = 16
    """Optimised points per reference and method."""
    steps: int = 300
    lr: float = 0.03
    seed: int = 0


def toy_mixtures(config: ToyConfig) -> tuple[GaussianMixture, GaussianMixture]:
    """(prompt mixture with 4 modes on a circle, broad unconditional Gaussian)."""
    angles = torch.tensor([45.0, 135.0, 225.0, 315.0], dtype=torch.float64) * math.pi / 180
    means = config.radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.tensor([config.weight_ratio**k for k in range(4)], dtype=torch.float64)
    cond = GaussianMixture.from_weights(means, config.component_std, weights)
    uncond = GaussianMixture.from_weights(torch.zeros(1, 2), config.uncond_std, torch.ones(1))
    return cond, uncond


def toy_teacher(config: ToyConfig, reference_index: int, tilt: float | None = None) -> AnalyticTeacher:
    """The teacher whose reference is mode ``reference_index`` of :func:`toy_mixtures`."""
    cond, uncond = toy_mixtures(config)
    return AnalyticTeacher(
        cond, uncond, cond.means[reference_index],
        config.tilt if tilt is None else tilt, config.null_flatten,
    )


def gradient_statistics(
    teacher: AnalyticTeacher,
    x0: Tensor,
    t: int,
    draws: int,
    generator: torch.Generator,
    ip_scale: float = 0.5,
    guidance_scale: float = 7.5,
    sd_branch: str = "vanilla",
) -> dict[str, float]:
    """Noise statistics of the gradients w(t)·r of SDS (B), IP-SDS (A) and ISD at one t.

    ``x0`` (M, D) clean points; for each, ``draws`` shared noise draws. Variances are traces of
    the per-point covariance over noise, averaged over points (population normalisation);
    SNR = ‖E g‖² / Var g (pooled the same way). ISD is computed through its own
    :class:`LossSpec`, not as A − B.
    """
    m, d = x0.shape
    points = x0.to(torch.float64).repeat_interleave(draws, dim=0)
    noise = torch.randn(points.shape, generator=generator, dtype=torch.float64)
    timesteps = torch.full((m * draws,), int(t), dtype=torch.long)
    params = losses.LossParams(guidance_scale=guidance_scale)
    grads = {
        name: teacher.latent_gradient(
            losses.loss_spec(name, sd_branch), points, timesteps, noise, params, ip_scale
        ).view(m, draws, d)
        for name in ("ip_sds", "sds", "isd")
    }
    centred = {k: g - g.mean(dim=1, keepdim=True) for k, g in grads.items()}

    def var(g: Tensor) -> float:
        return float(g.pow(2).sum(-1).mean())

    a, b = centred["ip_sds"], centred["sds"]
    var_a, var_b, var_isd = var(a), var(b), var(centred["isd"])
    cov = float((a * b).sum(-1).mean())
    corr = cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else float("nan")
    threshold = 0.5 * math.sqrt(var_b / var_a) if var_a > 0 else float("inf")
    threshold_sds = 0.5 * math.sqrt(var_a / var_b) if var_b > 0 else float("inf")
    stats = {
        "t": int(t),
        "var_sds": var_b,
        "var_ip_sds": var_a,
        "var_isd": var_isd,
        "cov_ip_sds_sds": cov,
        "corr": corr,
        "corr_threshold": threshold,
        "isd_below_ip_sds_predicted": bool(corr > threshold),
        "isd_below_ip_sds": bool(var_isd < var_a),
        "corr_threshold_sds": threshold_sds,
        "isd_below_sds_predicted": bool(corr > threshold_sds),
        "isd_below_sds": bool(var_isd < var_b),
    }
    for name, g in grads.items():
        mean_sq = float(g.mean(dim=1).pow(2).sum(-1).mean())
        stats[f"snr_{name}"] = mean_sq / max(var(centred[name]), 1e-300)
        stats[f"norm_{name}"] = float(g.norm(dim=-1).mean())
    return stats


def _to_points(theta: Tensor, bounded: bool) -> Tensor:
    return 2.0 * torch.sigmoid(theta) - 1.0 if bounded else theta


def optimise_points(
    teacher: AnalyticTeacher,
    method: str,
    init: Tensor,
    steps: int,
    generator: torch.Generator,
    lr: float = 0.02,
    bounded: bool = True,
    ip_scale: float = 0.5,
    guidance_scale: float = 7.5,
) -> Tensor:
    """Optimise points (N, 2) with Adam, one independent t and noise per point each step.

    ``method`` ∈ :data:`METHODS`; ``bounded`` parametrises x = 2·sigmoid(θ) − 1 (like
    sigmoid colours of a render), otherwise x = θ. Timesteps follow the MVDream anneal of
    :func:`timestep_range`; ``isd_sds`` weights ISD and SDS with :func:`loss_weights`.
    Returns the final points (N, 2).
    """
    if method not in METHODS:
        raise ValueError(f"unknown toy method {method!r}; expected one of {METHODS}")
    init = init.to(torch.float64)
    theta0 = torch.logit((init + 1.0) / 2.0, eps=1e-6) if bounded else init.clone()
    theta = theta0.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([theta], lr=lr)
    params = losses.LossParams(guidance_scale=guidance_scale)
    terms = {"isd_sds": ("isd", "sds")}.get(method, (method,))
    specs = {name: losses.loss_spec(name) for name in terms}
    for step in range(steps):
        t_min, t_max = timestep_range(step, steps)
        t = sample_timesteps(generator, init.shape[0], t_min, t_max)
        noise = torch.randn(init.shape, generator=generator, dtype=torch.float64)
        x = _to_points(theta, bounded)
        x0 = x.detach()
        if method == "isd_sds":
            alpha, beta = loss_weights(step, steps)
            weights = {"isd": alpha, "sds": beta}
        else:
            weights = {method: 1.0}
        grad = sum(
            weights[name] * teacher.latent_gradient(specs[name], x0, t, noise, params, ip_scale)
            for name in terms
        )
        optimiser.zero_grad(set_to_none=True)
        x.backward(grad)
        optimiser.step()
    return _to_points(theta.detach(), bounded)


def nearest_mode(mixture: GaussianMixture, points: Tensor) -> Tensor:
    """(N,) index of the mode whose basin (clean responsibility argmax) holds each point."""
    return mixture.responsibilities(points.to(torch.float64)).argmax(dim=1)


def run(config: ToyConfig, out_dir: Path | None = None) -> dict:
    """Compute the table and the optimisation results; write PNG/JSON/MD when ``out_dir``."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    cond, _ = toy_mixtures(config)
    x0 = cond.sample(config.points, generator)
    table = []
    for tilt in config.tilts:
        teacher = toy_teacher(config, reference_index=3, tilt=tilt)
        for t in config.timesteps:
            row = gradient_statistics(
                teacher, x0, t, config.draws, generator, config.ip_scale, config.guidance_scale
            )
            row["tilt"] = float(tilt)
            table.append(row)

    init = (torch.rand((config.seeds, 2), generator=generator, dtype=torch.float64) * 2 - 1) * 0.9
    finals: dict[str, dict[int, Tensor]] = {m: {} for m in (*METHODS, "isd_unbounded")}
    for ref in range(cond.num_components):
        teacher = toy_teacher(config, ref)
        for method in METHODS:
            finals[method][ref] = optimise_points(
                teacher, method, init, config.steps, generator, config.lr, True,
                config.ip_scale, config.guidance_scale,
            )
        finals["isd_unbounded"][ref] = optimise_points(
            teacher, "isd", init, config.steps, generator, config.lr, False,
            config.ip_scale, config.guidance_scale,
        )
    outcomes = {}
    for method, per_ref in finals.items():
        outcomes[method] = {}
        for ref, points in per_ref.items():
            modes = nearest_mode(cond, points)
            outcomes[method][str(ref)] = {
                "mode_counts": torch.bincount(modes, minlength=cond.num_components).tolist(),
                "fraction_at_reference": float((modes == ref).double().mean()),
                "mean_distance_to_reference_mode": float((points - cond.means[ref]).norm(dim=1).mean()),
            }
    result = {
        "config": asdict(config),
        "mode_means": cond.means.tolist(),
        "mode_weights": cond.weights.tolist(),
        "variance_table": table,
        "optimisation": outcomes,
        "seconds": 0.0,
    }
    result["seconds"] = time.perf_counter() - started
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "toy2d.json").write_text(json.dumps(result, indent=2))
        (out_dir / "toy2d.md").write_text(markdown_report(result))
        plot(result, finals, cond, out_dir / "toy2d.png")
    return result


def markdown_report(result: dict) -> str:
    """The variance/SNR table and the optimisation outcome as markdown."""
    lines = [
        "# 2D toy: gradient variance per t and tilt (analytic teacher)",
        "",
        "Var = trace of the noise covariance of w(t)·r, averaged over clean points. "
        "A = IP-SDS, B = SDS; ISD < IP-SDS exactly when corr > ½·sd B/sd A, ISD < SDS exactly "
        "when corr > ½·sd A/sd B.",
        "",
        "| tilt | t | Var SDS | Var IP-SDS | Var ISD | corr(A,B) | ½·sdB/sdA | ½·sdA/sdB | ISD<IP-SDS "
        "| ISD<SDS | SNR SDS | SNR IP-SDS | SNR ISD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variance_table"]:
        lines.append(
            f"| {r['tilt']:g} | {r['t']} | {r['var_sds']:.3g} | {r['var_ip_sds']:.3g} | "
            f"{r['var_isd']:.3g} | {r['corr']:.3f} | {r['corr_threshold']:.3f} | {r['corr_threshold_sds']:.3f} | "
            f"{'yes' if r['isd_below_ip_sds'] else 'no'} | {'yes' if r['isd_below_sds'] else 'no'} | "
            f"{r['snr_sds']:.3g} | {r['snr_ip_sds']:.3g} | {r['snr_isd']:.3g} |"
        )
    lines += [
        "",
        "## Where optimised points end (bounded x = 2·sigmoid(θ) − 1 unless noted)",
        "",
        "| method | reference | points per mode | fraction at reference | mean distance to reference mode |",
        "|---|---|---|---|---|",
    ]
    for method, per_ref in result["optimisation"].items():
        for ref, o in per_ref.items():
            lines.append(
                f"| {method} | {ref} | {o['mode_counts']} | {o['fraction_at_reference']:.2f} | "
                f"{o['mean_distance_to_reference_mode']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, finals: dict, cond: GaussianMixture, path: Path) -> None:
    """PNG: variance and mean gradient norm per t (one line per method and tilt), final points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(finals)
    fig, axes = plt.subplots(2, max(3, len(methods)), figsize=(4 * max(3, len(methods)), 8))
    colours = {"sds": "tab:blue", "ip_sds": "tab:orange", "isd": "tab:green"}
    tilts = sorted({r["tilt"] for r in result["variance_table"]})
    styles = ["-", "--", ":", "-."]
    for i, tilt in enumerate(tilts):
        rows = [r for r in result["variance_table"] if r["tilt"] == tilt]
        ts = [r["t"] for r in rows]
        for name, colour in colours.items():
            style = styles[i % len(styles)]
            axes[0, 0].plot(ts, [r[f"var_{name}"] for r in rows], style, color=colour,
                            label=f"{name} τ={tilt:g}")
            axes[0, 1].plot(ts, [r[f"norm_{name}"] for r in rows], style, color=colour,
                            label=f"{name} τ={tilt:g}")
            axes[0, 2].plot(ts, [r[f"snr_{name}"] for r in rows], style, color=colour,
                            label=f"{name} τ={tilt:g}")
    for ax, title in zip(axes[0, :3], ("gradient variance", "mean gradient norm", "SNR")):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.set_yscale("log")
    axes[0, 0].legend(fontsize=6)
    for ax in axes[0, 3:]:
        ax.axis("off")

    grid = torch.linspace(-1, 1, 120, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = cond.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)).exp().view(120, 120)
    ref_colours = ["tab:red", "tab:purple", "tab:brown", "tab:cyan"]
    for ax, method in zip(axes[1], methods):
        ax.contourf(gx.numpy(), gy.numpy(), density.numpy(), levels=20, cmap="Greys")
        for ref, points in finals[method].items():
            p = points.numpy()
            ax.scatter(p[:, 0], p[:, 1], s=6, color=ref_colours[ref % 4], label=f"ref {ref}")
            m = cond.means[ref].numpy()
            ax.scatter([m[0]], [m[1]], marker="x", s=60, color=ref_colours[ref % 4])
        extent = max(1.3, max(float(p.abs().max()) for p in finals[method].values()) * 1.05)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_title(f"final points: {method}")
    axes[1, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.toy2d", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m stages.toy2d\n  python -m stages.toy2d --out outputs/toy2d_quick --draws 64 --seeds 8\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/toy2d"), help="output directory")
    parser.add_argument("--draws", type=int, default=ToyConfig.draws, help="noise draws per point and t")
    parser.add_argument("--seeds", type=int, default=ToyConfig.seeds, help="points per reference and method")
    parser.add_argument("--steps", type=int, default=ToyConfig.steps, help="optimisation steps")
    parser.add_argument("--seed", type=int, default=ToyConfig.seed)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (the toy's tensors are tiny: one thread is fastest)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    config = ToyConfig(draws=args.draws, seeds=args.seeds, steps=args.steps, seed=args.seed)
    result = run(config, args.out)
    print(markdown_report(result))
    print(f"wrote {args.out}/toy2d.png, toy2d.json, toy2d.md in {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
