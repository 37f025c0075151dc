"""Single-asset CLI: optimise one prompt in-process (no Ray) and write its asset files.

    python -m stages.optimize --prompt "a red apple" models=tiny --out outputs/apple
    python -m stages.optimize --prompt "a red apple" --reference apple.png --out outputs/apple
    python -m stages.optimize --prompt "a ring" --config configs/quickstart.yaml   # the toy world
    python -m stages.optimize --prompt "a chair" --config configs/quickstart_tiny.yaml iterations=300

Positional ``key=value`` overrides go to the method config (``iterations=300``,
``representation=splats``, ``schedule.resolutions=[32,64]``; a ``method.`` prefix is
accepted), ``models.<key>=...`` to the model sources, ``models=tiny`` makes every model a
tiny random one on the CPU and ``models=toyworld`` every model the toy world (both start the
method from the ``tiny`` preset unless ``preset=paper`` is given; for the toy world's tuned
settings pass ``--config configs/quickstart.yaml``). A YAML ``--config`` may hold ``method:`` / ``models:`` /
``method_preset:`` sections (a pipeline config works) or method keys at top level.

The asset id and seeds follow the pipeline's rule (:mod:`stages.optimize.identity`): with the
same config, ``--seed`` (the pipeline's ``seed``) and ``--variant``, this makes the asset a dataset
run names ``<slug>-v<variant>-<hash>``. Rerunning with the same ``--out`` resumes from the last
checkpoint in ``<out>/work``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

from stages.asset_layout import ASSET_RECORD, METRICS_FILE
from stages.atomic import atomic_write
from stages.models.config import ModelDtype, ModelsConfig

MODEL_KEYS = ("sd", "ip_adapter", "image_encoder", "mvdream", "mvdream_text", "reference")
MODEL_SHORTCUTS = ("tiny", "toyworld")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stages.optimize",
        description=__doc__.split("\n\n")[0].splitlines()[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", required=True, help="text prompt of the asset")
    parser.add_argument("--reference", default=None, help="reference image (PNG/JPEG); sampled from the prompt when absent")
    parser.add_argument("--config", default=None, help="YAML with method:/models: sections or method keys")
    parser.add_argument("--out", default=None, help="output directory (default outputs/single/<asset_id>)")
    parser.add_argument("--seed", type=int, default=None, help="base seed (the pipeline's `seed`; default: the --config's `seed`, else 0); the asset's seeds derive from it")
    parser.add_argument("--variant", type=int, default=0, help="variant index of the prompt (the pipeline's variant k)")
    parser.add_argument("--reference-steps", type=int, default=30, help="sampling steps of the reference image")
    parser.add_argument("--asset-id", default=None, help="asset id (default: the pipeline's <slug>-v<variant>-<hash>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (method keys, models.<key>, models=tiny|toyworld, preset=tiny)")
    return parser.parse_intermixed_args(argv)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """(method overrides, models overrides, ``models=`` shortcut given: tiny / toyworld / None)."""
    method, models, shortcut = [], [], None
    for token in overrides:
        if "=" not in token:
            raise ValueError(f"override {token!r} is not key=value")
        key, value = token.split("=", 1)
        if key == "models":
            if value not in MODEL_SHORTCUTS:
                raise ValueError(f"models={value!r}: the shortcuts are models=tiny and models=toyworld; set models.<key>=... otherwise")
            shortcut = value
        elif key.startswith("models."):
            models.append(token[len("models."):])
        elif key in ("method_preset", "method.preset"):
            method.append(f"preset={value}")
        else:
            method.append(token[len("method."):] if key.startswith("method.") else token)
    return method, models, shortcut


def build_models_config(file_section: Any, overrides: Sequence[str], shortcut: str | None) -> ModelsConfig:
    """ModelsConfig ← ``models=tiny|toyworld`` shortcut ← YAML ``models:`` section ← ``models.<key>`` overrides."""
    from stages.config_loading import merge_config, to_object

    base = ModelsConfig()
    if shortcut:
        base = ModelsConfig(**{k: shortcut for k in MODEL_KEYS}, device="cpu", dtype=ModelDtype.float32)
    merged = merge_config(base, file_section, overrides=overrides, source="models config", key_prefix="models.")
    return to_object(merged, "models config", key_prefix="models.")


def build_configs(args: argparse.Namespace) -> tuple[Any, ModelsConfig]:
    """The method (OptimizeConfig) and models config of this run; sets ``args.seed`` from the
    ``--config``'s ``seed`` when not given."""
    from omegaconf import OmegaConf

    from stages.config_loading import read_yaml
    from stages.optimize.config import load_optimize_config

    method_overrides, model_overrides, shortcut = split_overrides(args.overrides)
    file_cfg = read_yaml(args.config, what="--config") if args.config else OmegaConf.create({})
    models_section = file_cfg.get("models", None)
    if args.seed is None:
        args.seed = int(file_cfg.get("seed", 0)) if "method" in file_cfg or "models" in file_cfg else 0
    preset = file_cfg.get("method_preset", None)
    if "method" in file_cfg or "models" in file_cfg or "method_preset" in file_cfg:
        method_section = file_cfg.get("method", None) or OmegaConf.create({})
    else:
        method_section = file_cfg
    if preset is not None and "preset" not in method_section:
        method_section["preset"] = preset
    if shortcut and "preset" not in method_section and not any(o.startswith("preset=") for o in method_overrides):
        method_overrides = ["preset=tiny", *method_overrides]
    config = load_optimize_config(method_section, method_overrides)
    return config, build_models_config(models_section, model_overrides, shortcut)


def build_guidance(config: Any, models: ModelsConfig) -> Any:
    """In-process guidance for the configured loss: IP and/or multi-view side (diffusers models
    or the toy world, per ``models``)."""
    from stages.guidance.set import GuidanceSet
    from stages.models.factory import build_ip_guidance, build_mvd_guidance

    ip = build_ip_guidance(models) if config.uses_ip else None
    mvd = build_mvd_guidance(models) if config.uses_mvd else None
    return GuidanceSet(ip=ip, mvd=mvd)


def load_or_sample_reference(args: argparse.Namespace, config: Any, models: ModelsConfig, seed: int) -> Any:
    """The ``--reference`` image (validated), or one sampled with ``models.reference``."""
    from stages.export.preview import as_rgb_image
    from stages.models.factory import build_reference_sampler

    if args.reference is not None:
        return as_rgb_image(args.reference)
    sampler = build_reference_sampler(models)
    return sampler.sample(args.prompt, seed=seed, num_inference_steps=args.reference_steps)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, models = build_configs(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from stages.optimize.identity import asset_id_for, derived_seed, identity_digest

    config.progress = not args.no_progress
    digest = identity_digest(config, models, args.seed)
    asset_id = args.asset_id or asset_id_for(args.prompt, args.variant, digest)
    reference_seed = derived_seed(args.seed, args.prompt, args.variant, "reference")
    seed = derived_seed(args.seed, args.prompt, args.variant, "optimize")
    out = Path(args.out) if args.out else Path("outputs/single") / asset_id
    try:
        reference = load_or_sample_reference(args, config, models, reference_seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from stages.export import export_asset
    from stages.optimize.loop import NonFiniteLossError, optimize_asset

    started = time.time()
    guidance = build_guidance(config, models)
    print(f"optimising {asset_id!r}: {config.representation}, loss {config.loss}, {config.iterations} iterations -> {out}", file=sys.stderr)
    try:
        result = optimize_asset(config, guidance, reference, seed, out / "work", args.prompt, asset_id)
    except NonFiniteLossError as error:
        print(f"error: {error}; the last checkpoint is in {out / 'work'}", file=sys.stderr)
        return 1
    files = export_asset(result.scene, out, config, reference)
    metrics = {**result.metrics, "duration_s": time.time() - started}
    with atomic_write(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    asset = {
        "asset_id": asset_id,
        "prompt": args.prompt,
        "variant": args.variant,
        "reference_seed": reference_seed if args.reference is None else None,
        "seed": seed,
        "base_seed": args.seed,
        "method": config.loss,
        "representation": config.representation,
        "config_digest": digest,
        "models": {f.name: getattr(models, f.name) for f in fields(models)},
        "method_config": asdict(config),
        "files": files,
    }
    with atomic_write(out / ASSET_RECORD) as tmp:
        tmp.write_text(json.dumps(asset, indent=2, default=str))
    extra = {"metrics": METRICS_FILE, "record": ASSET_RECORD}
    for kind, name in sorted({**files, **extra}.items()):
        print(f"{kind:>10}: {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
