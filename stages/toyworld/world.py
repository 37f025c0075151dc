"""The toy world as data: prompts, their objects, the "models'" parameters (a YAML file).

A world file (``stages/toyworld/worlds/default.yaml`` ships; ``models.toyworld`` names any
other) has four sections::

    model:     the exact "diffusion models" (docs/TOYWORLD.md explains every number)
      weight_ratio, component_std, evidence_dims, tilt, null_flatten, uncond
    render:    light_direction, ambient, diffuse, background, supersample
    reference: the reference sampler's camera: elevation, azimuth, distance, fovy, resolution
    start:     a primitive like the optimiser's initial scene (object 0 is made unlike it)
    prompts:
      <prompt>:
        objects: [...]        # explicit objects, first = dominant (π_k ∝ weight_ratio^k)
        generate: {...}       # or drawn from a seeded family (see :func:`generate_objects`)

An explicit object is ``{name, parts: [part, ...]}``; a part is ``{shape, <size keys>,
position: [x, y, z], rotation: [yaw, pitch, roll] (degrees), colour: name | [r, g, b]}`` with
size keys ``sphere: radius``, ``ellipsoid: radii``, ``box: size`` (edge lengths),
``cylinder / cone: radius, height``, ``torus: radius, thickness``. Errors name the file, the
prompt, the object and the key.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from stages.toyworld.render import SHAPES, PrimitiveTable, Shading, render_objects, rotation_matrix

DEFAULT_WORLD = Path(__file__).with_name("worlds") / "default.yaml"
WORLD_KEY = "models.toyworld"
GROUND = -0.5
"""Generated objects stand on this plane (z, world units)."""
MAX_RADIUS = 0.95
"""Generated objects fit in this ball (the NeRF scene is the unit ball)."""

COLOURS = {
    "red": (0.85, 0.12, 0.1), "orange": (0.95, 0.5, 0.05), "yellow": (0.95, 0.82, 0.1),
    "green": (0.15, 0.65, 0.2), "teal": (0.05, 0.55, 0.55), "cyan": (0.2, 0.75, 0.9),
    "blue": (0.12, 0.25, 0.85), "purple": (0.5, 0.18, 0.7), "pink": (0.95, 0.45, 0.7),
    "brown": (0.5, 0.3, 0.12), "black": (0.08, 0.08, 0.08), "grey": (0.5, 0.5, 0.5),
    "white": (0.92, 0.92, 0.92),
}
"""Named colours a world file may use (or give [r, g, b] in [0, 1])."""


class WorldError(ValueError):
    """A world file (or a prompt it lacks) is invalid; the message names the file and key."""


@dataclass(frozen=True)
class Part:
    """One primitive: ``shape`` in :data:`~stages.toyworld.render.SHAPES`, ``size`` (a, b, c)
    as the renderer reads it, ``position`` (world), ``rotation`` (yaw, pitch, roll) degrees."""

    shape: str
    size: tuple[float, float, float]
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    colour: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ToyObject:
    name: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class ModelParams:
    """The exact models' knobs (docs/TOYWORLD.md: what each models and why this value)."""

    weight_ratio: float = 0.8
    """Text prior π_k ∝ weight_ratio^k over a prompt's objects (object 0 dominates)."""
    component_std: float = 0.1
    """σ of every component around its object's render (latent units, latent = 2·rgb − 1)."""
    evidence_dims: float = 128.0
    """Likelihood temperature: responsibilities use the per-pixel mean squared distance times
    this many dimensions per view (instead of the image's 3·H·W)."""
    tilt: float = 5.0
    """τ: log-weight added to the reference's object per unit IP scale."""
    null_flatten: float = 0.3
    """ν: the null image embedding at IP scale s raises the weights to the power 1 − ν·s."""
    uncond: str = "prompt"
    """Unconditional branch: ``prompt`` (the prompt's objects, equal weights) | ``world`` (every
    object of the world, equal weights; renders all of them for every request)."""


@dataclass(frozen=True)
class ReferenceCamera:
    elevation: float = 15.0
    azimuth: float = 0.0
    distance: float = 3.0
    fovy: float = 40.0
    """Degrees (the project's turntable camera: ``cameras.eval_*``)."""
    resolution: int = 128


@dataclass
class World:
    """Prompts → ordered objects, plus the models' and renderer's parameters."""

    path: str
    model: ModelParams
    shading: Shading
    supersample: int
    reference: ReferenceCamera
    start: Part
    prompts: dict[str, list[ToyObject]] = field(default_factory=dict)

    @property
    def objects(self) -> list[ToyObject]:
        """Every object of the world, prompt by prompt (the ``world`` unconditional's components)."""
        return [obj for objs in self.prompts.values() for obj in objs]

    def prompt_slice(self, prompt: str) -> slice:
        """Where ``prompt``'s objects sit in :attr:`objects`."""
        start = 0
        for name, objs in self.prompts.items():
            if name == prompt:
                return slice(start, start + len(objs))
            start += len(objs)
        raise self.unknown(prompt)

    def unknown(self, prompt: str, where: str = "") -> WorldError:
        at = f"{where}: " if where else ""
        known = ", ".join(repr(p) for p in self.prompts)
        return WorldError(f"{at}prompt {prompt!r} is not in the toy world {self.path} (it knows {known})")

    def check_prompt(self, prompt: str, where: str = "") -> None:
        if prompt not in self.prompts:
            raise self.unknown(prompt, where)

    @cached_property
    def table(self) -> PrimitiveTable:
        """All objects' parts as one :class:`PrimitiveTable` (object index = position in :attr:`objects`)."""
        return primitive_table(self.objects)

    def prompt_table(self, prompt: str) -> PrimitiveTable:
        span = self.prompt_slice(prompt)
        return self.table.select(torch.arange(span.start, span.stop))

    def log_weights(self, prompt: str) -> torch.Tensor:
        """(K,) normalised log π_k of ``prompt``'s objects (float64)."""
        k = len(self.prompts[prompt]) if prompt in self.prompts else None
        if k is None:
            raise self.unknown(prompt)
        log_w = torch.arange(k, dtype=torch.float64) * math.log(self.model.weight_ratio)
        return log_w - log_w.logsumexp(0)

    def digest(self) -> str:
        """Hash of everything that changes what the world renders or predicts."""
        payload = repr((self.model, self.shading, self.supersample, self.reference, self.start, self.prompts))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def primitive_table(objects: list[ToyObject]) -> PrimitiveTable:
    parts = [(index, part) for index, obj in enumerate(objects) for part in obj.parts]
    return PrimitiveTable(
        shape=torch.tensor([SHAPES.index(p.shape) for _, p in parts], dtype=torch.long),
        size=torch.tensor([p.size for _, p in parts], dtype=torch.float32).reshape(-1, 3),
        position=torch.tensor([p.position for _, p in parts], dtype=torch.float32).reshape(-1, 3),
        rotation=torch.stack([rotation_matrix(*p.rotation) for _, p in parts]) if parts else torch.zeros(0, 3, 3),
        colour=torch.tensor([p.colour for _, p in parts], dtype=torch.float32).reshape(-1, 3),
        owner=torch.tensor([i for i, _ in parts], dtype=torch.long),
        num_objects=len(objects),
    )


# ---------------------------------------------------------------------------- parsing
def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorldError(f"{where}: expected a number, got {value!r}")
    if positive and value <= 0:
        raise WorldError(f"{where}: must be > 0, got {value!r}")
    return float(value)


def _vector(value: Any, where: str, positive: bool = False) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise WorldError(f"{where}: expected three numbers [x, y, z], got {value!r}")
    x, y, z = (_number(v, where, positive) for v in value)
    return (x, y, z)


def _colour(value: Any, where: str) -> tuple[float, float, float]:
    if isinstance(value, str):
        if value not in COLOURS:
            raise WorldError(f"{where}: unknown colour {value!r}; use [r, g, b] or one of {sorted(COLOURS)}")
        return COLOURS[value]
    rgb = _vector(value, where)
    if not all(0.0 <= c <= 1.0 for c in rgb):
        raise WorldError(f"{where}: colour components must be in [0, 1], got {list(value)}")
    return rgb


_SIZE_KEYS = {
    "sphere": ("radius",), "ellipsoid": ("radii",), "box": ("size",), "cylinder": ("radius", "height"),
    "cone": ("radius", "height"), "torus": ("radius", "thickness"),
}


def part_size(shape: str, spec: dict[str, Any], where: str) -> tuple[str, tuple[float, float, float]]:
    """(renderer shape, (a, b, c)) from a part's user-facing size keys."""
    if shape not in _SIZE_KEYS:
        raise WorldError(f"{where}.shape: unknown shape {shape!r}; expected one of {sorted(_SIZE_KEYS)}")
    missing = [k for k in _SIZE_KEYS[shape] if k not in spec]
    if missing:
        raise WorldError(f"{where}: a {shape} needs {missing[0]!r}")
    if shape == "sphere":
        r = _number(spec["radius"], f"{where}.radius", positive=True)
        return "ellipsoid", (r, r, r)
    if shape == "ellipsoid":
        return "ellipsoid", _vector(spec["radii"], f"{where}.radii", positive=True)
    if shape == "box":
        x, y, z = _vector(spec["size"], f"{where}.size", positive=True)
        return "box", (x / 2, y / 2, z / 2)
    radius = _number(spec["radius"], f"{where}.radius", positive=True)
    if shape == "torus":
        thickness = _number(spec["thickness"], f"{where}.thickness", positive=True)
        if thickness >= radius:
            raise WorldError(f"{where}.thickness: must be < radius ({radius}), got {thickness}")
        return "torus", (radius, radius, thickness)
    height = _number(spec["height"], f"{where}.height", positive=True)
    return shape, (radius, radius, height / 2)


def parse_part(spec: Any, where: str) -> Part:
    if not isinstance(spec, dict) or "shape" not in spec:
        raise WorldError(f"{where}: expected a mapping with a 'shape', got {spec!r}")
    allowed = {"shape", "position", "rotation", "colour", *_SIZE_KEYS.get(spec["shape"], ())}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise WorldError(f"{where}: unknown key {extra[0]!r} for a {spec['shape']} (allowed: {sorted(allowed)})")
    shape, size = part_size(spec["shape"], spec, where)
    return Part(
        shape=shape,
        size=size,
        position=_vector(spec.get("position", [0, 0, 0]), f"{where}.position"),
        rotation=_vector(spec.get("rotation", [0, 0, 0]), f"{where}.rotation"),
        colour=_colour(spec.get("colour", "grey"), f"{where}.colour"),
    )


def parse_object(spec: Any, where: str) -> ToyObject:
    if not isinstance(spec, dict) or not isinstance(spec.get("parts"), list) or not spec["parts"]:
        raise WorldError(f"{where}: expected {{name, parts: [...]}} with at least one part, got {spec!r}")
    parts = tuple(parse_part(p, f"{where}.parts[{i}]") for i, p in enumerate(spec["parts"]))
    return ToyObject(str(spec.get("name", where.rsplit(".", 1)[-1])), parts)


def _section(raw: dict[str, Any], key: str, cls: type, where: str) -> Any:
    values = raw.get(key) or {}
    if not isinstance(values, dict):
        raise WorldError(f"{where}.{key}: expected a mapping, got {values!r}")
    known = set(cls.__dataclass_fields__)
    extra = sorted(set(values) - known)
    if extra:
        raise WorldError(f"{where}.{key}.{extra[0]}: unknown key (known: {sorted(known)})")
    return values


def load_world(source: str | Path = "default") -> World:
    """Read and validate a world file (``default``: the shipped one); objects of ``generate``
    families are drawn here, deterministically. Cached per file content: do not mutate the result."""
    path = DEFAULT_WORLD if str(source) in ("", "default") else Path(source).expanduser()
    if not path.is_file():
        raise WorldError(f"{WORLD_KEY}: world file not found: {source}")
    return _load_world(str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest())


@lru_cache(maxsize=8)
def _load_world(path_text: str, content_hash: str) -> World:
    path = Path(path_text)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise WorldError(f"{path}: cannot parse YAML: {error}") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise WorldError(f"{where}: expected a mapping with 'prompts'")
    extra = sorted(set(raw) - {"model", "render", "reference", "start", "prompts"})
    if extra:
        raise WorldError(f"{where}.{extra[0]}: unknown section (known: model, render, reference, start, prompts)")
    model_raw = _section(raw, "model", ModelParams, where)
    model = ModelParams(**{k: (v if k == "uncond" else _number(v, f"{where}.model.{k}")) for k, v in model_raw.items()})
    _check_model(model, where)
    render_raw = dict(raw.get("render") or {})
    supersample = render_raw.pop("supersample", 1)
    if not isinstance(supersample, int) or supersample < 1:
        raise WorldError(f"{where}.render.supersample: must be an integer >= 1, got {supersample!r}")
    shading_raw = _section({"render": render_raw}, "render", Shading, where)
    shading = Shading(
        **{k: (_vector(v, f"{where}.render.{k}") if isinstance(getattr(Shading, k), tuple) else _number(v, f"{where}.render.{k}"))
           for k, v in shading_raw.items()}
    )
    reference_raw = _section(raw, "reference", ReferenceCamera, where)
    reference = ReferenceCamera(**{k: _number(v, f"{where}.reference.{k}") for k, v in reference_raw.items()})
    reference = ReferenceCamera(**{**reference.__dict__, "resolution": int(reference.resolution)})
    start = parse_part(raw.get("start") or {"shape": "sphere", "radius": 0.5, "colour": "grey"}, f"{where}.start")
    world = World(str(path), model, shading, supersample, reference, start)
    prompts = raw.get("prompts")
    if not isinstance(prompts, dict) or not prompts:
        raise WorldError(f"{where}.prompts: expected a mapping prompt -> {{objects | generate}}, got {prompts!r}")
    for prompt, spec in prompts.items():
        key = f"{where}.prompts[{prompt!r}]"
        if not isinstance(prompt, str) or not prompt.strip():
            raise WorldError(f"{key}: prompts must be non-empty strings")
        if not isinstance(spec, dict) or len({"objects", "generate"} & set(spec)) != 1 or set(spec) - {"objects", "generate"}:
            raise WorldError(f"{key}: expected exactly one of 'objects' (a list) or 'generate' (a family)")
        if "objects" in spec:
            if not isinstance(spec["objects"], list) or not spec["objects"]:
                raise WorldError(f"{key}.objects: expected a non-empty list")
            objects = [parse_object(o, f"{key}.objects[{i}]") for i, o in enumerate(spec["objects"])]
        else:
            objects = generate_objects(spec["generate"], world, f"{key}.generate")
        world.prompts[prompt.strip()] = objects
    return world


def _check_model(model: ModelParams, where: str) -> None:
    checks = [
        (0 < model.weight_ratio <= 1, "weight_ratio", "must be in (0, 1]"),
        (model.component_std > 0, "component_std", "must be > 0"),
        (model.evidence_dims > 0, "evidence_dims", "must be > 0"),
        (model.tilt >= 0, "tilt", "must be >= 0"),
        (0 <= model.null_flatten < 1, "null_flatten", "must be in [0, 1)"),
        (model.uncond in ("world", "prompt"), "uncond", "must be 'world' or 'prompt'"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise WorldError(f"{where}.model.{key}: {message}, got {getattr(model, key)!r}")


# ---------------------------------------------------------------------------- families
@dataclass
class Family:
    """A ``generate`` spec: ``count`` objects drawn with ``seed``. Each has a body (shape from
    ``shapes``, colour from ``colours``, scale in ``size``, standing on the ground at most
    ``spread`` from the centre, random yaw and aspect) and, with probability ``stacked``, a
    smaller part of another colour on top (shape from ``top_shapes``)."""

    count: int = 12
    seed: int = 0
    shapes: list[str] = field(default_factory=lambda: ["box", "cylinder", "cone", "sphere", "torus"])
    top_shapes: list[str] = field(default_factory=lambda: ["sphere", "cone", "box", "cylinder"])
    colours: list[str] = field(default_factory=lambda: ["red", "orange", "yellow", "green", "blue", "purple"])
    size: list[float] = field(default_factory=lambda: [0.2, 0.34])
    spread: float = 0.25
    stacked: float = 0.5
    distinct_psnr: float = 17.0
    """A drawn object is redrawn while it is this close (dB, mean over 4 views) to an earlier one."""


def bounding_radius(obj: ToyObject) -> float:
    """Radius of a ball around the origin that holds ``obj`` (conservative)."""
    radius = 0.0
    for part in obj.parts:
        a, b, c = part.size
        extent = math.sqrt(a * a + b * b + c * c) if part.shape == "box" else (a + c if part.shape == "torus" else max(a, b, c))
        radius = max(radius, math.dist(part.position, (0, 0, 0)) + extent)
    return radius


def _body(shape: str, s: float, rng: random.Random) -> tuple[dict[str, Any], float]:
    """Part spec (without position) of a body of scale ``s`` and its half height."""
    aspect = lambda: rng.uniform(0.75, 1.3)  # noqa: E731
    if shape == "sphere":
        return {"shape": "sphere", "radius": s}, s
    if shape == "ellipsoid":
        radii = [s * aspect(), s * aspect(), s * aspect()]
        return {"shape": "ellipsoid", "radii": radii}, radii[2]
    if shape == "box":
        size = [2 * s * aspect(), 2 * s * aspect(), 2 * s * aspect()]
        return {"shape": "box", "size": size}, size[2] / 2
    if shape == "torus":  # standing ring, axis horizontal
        return {"shape": "torus", "radius": s, "thickness": 0.35 * s, "rotation": [0, 0, 90]}, 1.35 * s
    height = 2 * s * aspect() * (1.4 if shape == "cone" else 1.0)
    return {"shape": shape, "radius": s * aspect(), "height": height}, height / 2


def _draw_object(family: Family, rng: random.Random, where: str) -> dict[str, Any]:
    shape = rng.choice(family.shapes)
    colour = rng.choice(family.colours)
    s = rng.uniform(*family.size)
    body, half = _body(shape, s, rng)
    angle, radius = rng.uniform(0, 2 * math.pi), family.spread * math.sqrt(rng.random())
    x, y = radius * math.cos(angle), radius * math.sin(angle)
    yaw = rng.uniform(0, 360)
    body["position"] = [x, y, GROUND + half]
    body["rotation"] = [yaw, *body.get("rotation", [0, 0, 0])[1:]]
    body["colour"] = colour
    parts, name = [body], f"{colour} {shape}"
    if rng.random() < family.stacked:
        top_shape = rng.choice(family.top_shapes)
        top_colour = rng.choice([c for c in family.colours if c != colour] or family.colours)
        top, top_half = _body(top_shape, s * rng.uniform(0.45, 0.7), rng)
        top["position"] = [x + rng.uniform(-0.05, 0.05), y + rng.uniform(-0.05, 0.05), GROUND + 2 * half + top_half]
        top["rotation"] = [rng.uniform(0, 360), *top.get("rotation", [0, 0, 0])[1:]]
        top["colour"] = top_colour
        parts.append(top)
        name += f" with a {top_colour} {top_shape} on top"
    return {"name": name, "parts": parts}


def _four_views(table: PrimitiveTable, shading: Shading) -> torch.Tensor:
    """(K, 4, 3, 32, 32) renders from azimuth 0/90/180/270 at elevation 15 (distinctness checks)."""
    from stages.scene.cameras import orbit_cameras

    cams = orbit_cameras(4, 15.0, 3.0, 40.0)
    return render_objects(table, cams.c2w, cams.fovy, 32, 32, shading).rgb


def _mean_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over views of the PSNR (dB) between (V, 3, H, W) renders a and each of b (K, V, 3, H, W)."""
    mse = ((b - a[None]) ** 2).mean(dim=(2, 3, 4)).clamp_min(1e-10)
    return (-10 * mse.log10()).mean(-1)


def generate_objects(spec: Any, world: World, where: str) -> list[ToyObject]:
    """``count`` distinct objects of a :class:`Family` inside :data:`MAX_RADIUS`, deterministic in the spec; the object
    least like ``world.start`` (the optimiser's initial blob) comes first, so the dominant
    object is not where every optimisation starts."""
    if not isinstance(spec, dict):
        raise WorldError(f"{where}: expected a mapping, got {spec!r}")
    extra = sorted(set(spec) - set(Family.__dataclass_fields__))
    if extra:
        raise WorldError(f"{where}.{extra[0]}: unknown key (known: {sorted(Family.__dataclass_fields__)})")
    family = Family(**spec)
    if not isinstance(family.count, int) or family.count < 1:
        raise WorldError(f"{where}.count: must be an integer >= 1, got {family.count!r}")
    for key, allowed in (("shapes", _SIZE_KEYS), ("top_shapes", _SIZE_KEYS), ("colours", COLOURS)):
        values = getattr(family, key)
        bad = [v for v in values if v not in allowed] if isinstance(values, list) and values else [values]
        if bad:
            raise WorldError(f"{where}.{key}: {bad[0]!r} is not one of {sorted(allowed)}")
    if len(family.size) != 2 or not 0 < family.size[0] <= family.size[1] <= 0.5:
        raise WorldError(f"{where}.size: expected [low, high] with 0 < low <= high <= 0.5, got {family.size}")
    rng = random.Random(family.seed)
    accepted: list[ToyObject] = []
    views: list[torch.Tensor] = []
    for attempt in range(60 * family.count):
        if len(accepted) == family.count:
            break
        candidate = parse_object(_draw_object(family, rng, where), f"{where}[{len(accepted)}]")
        if bounding_radius(candidate) > MAX_RADIUS:
            continue
        rendered = _four_views(primitive_table([candidate]), world.shading)[0]
        if views and float(_mean_psnr(rendered, torch.stack(views)).max()) >= family.distinct_psnr:
            continue
        accepted.append(candidate)
        views.append(rendered)
    if len(accepted) < family.count:
        raise WorldError(
            f"{where}: could draw only {len(accepted)} of {family.count} objects at least "
            f"{family.distinct_psnr} dB apart inside radius {MAX_RADIUS}; widen shapes/colours/size or lower distinct_psnr"
        )
    start = _four_views(primitive_table([ToyObject("start", (world.start,))]), world.shading)[0]
    first = int(_mean_psnr(start, torch.stack(views)).argmin())
    return [accepted[first], *accepted[:first], *accepted[first + 1 :]]
