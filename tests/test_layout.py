"""The dataset layout seam: atomic writes, the manifest row in its typed and earlier forms, the one
digest."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.integrity import file_checksums, repair_manifest
from pipeline.manifest import MANIFEST_SCHEMA, ManifestRow
from pipeline.shards import DamagedPartError
from pipeline.writer import DatasetWriter
from stages.asset_layout import ASSET_FILES, ROLES
from stages.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]

# The manifest schema as the current main writes it: files / metrics JSON strings, times ISO strings.
OLD_SCHEMA = pa.schema(
    [(f.name, pa.string()) if f.name in ("files", "metrics", "started_at", "finished_at") else (f.name, f.type) for f in MANIFEST_SCHEMA]
)


def _old_row(asset_id: str, status: str, finished_at: str, loss: float) -> dict:
    return {
        "asset_id": asset_id, "prompt": "a red apple", "prompt_index": 0, "variant": 0, "reference_seed": 1, "seed": 2,
        "method": "isd", "representation": "nerf", "config_digest": "0123456789ab", "status": status, "error": None,
        "asset_dir": f"assets/{asset_id}", "files": json.dumps({"preview": f"assets/{asset_id}/preview.png"}),
        "metrics": json.dumps({"loss": loss}), "iterations": 5, "duration_s": 1.5,
        "started_at": "2026-01-01T00:00:00.000000+00:00", "finished_at": finished_at, "mlflow_run_id": None,
    }


# ------------------------------------------------------------------ atomic_write
def test_atomic_write_replaces_only_when_complete(tmp_path):
    path = tmp_path / "a" / "x.json"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp.suffix == ".json"
        tmp.write_text("one")
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert path.read_text() == "one" and [p.name for p in path.parent.iterdir()] == ["x.json"]
    with atomic_write(path, keep_previous=tmp_path / "a" / "x.prev.json") as tmp:
        tmp.write_text("two")
    assert path.read_text() == "two" and (tmp_path / "a" / "x.prev.json").read_text() == "one"


def test_temporary_siblings_are_invisible_to_shard_readers_and_checksums(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    writer.write_manifest([_old_row("a-v0-1", "succeeded", "2026-01-01T00:00:01.000000+00:00", 0.5)])
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "manifest" / "part-29990101T000000000000-dead.parquet") as tmp:
        tmp.write_bytes(b"PAR1 half a footer")  # a writer that died mid-write, its temp file left behind
        shutil.copy(tmp, tmp.with_name(tmp.name + ".kept"))
        raise RuntimeError
    assert any(p.name.startswith(".") for p in (tmp_path / "manifest").iterdir())
    assert len(writer.manifest_rows()) == 1 and writer.damaged_parts == {}
    assert ds.dataset(tmp_path / "manifest", format="parquet").count_rows() == 1
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "preview.png").write_bytes(b"png")
    (staged / ".preview.png.0123.tmp.png").write_bytes(b"partial")
    assert list(file_checksums(staged)) == ["preview.png"]


# ------------------------------------------------------------------ the manifest row
def test_rows_are_typed_in_arrow_and_dicts_in_python(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    row = ManifestRow(asset_id="a-v0-1", prompt="p", status="succeeded", files={"preview": "assets/a-v0-1/preview.png"},
                      metrics={"loss": 1}, finished_at="2026-03-01T12:00:00+01:00")
    writer.write_manifest([row])
    table = pq.read_table(writer.manifest_parts()[0])
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("metrics").to_pylist() == [[("loss", 1.0)]]
    assert str(table.column("finished_at").type) == "timestamp[us, tz=UTC]"
    (read,) = writer.manifest_rows()
    assert read["files"] == {"preview": "assets/a-v0-1/preview.png"} and read["metrics"] == {"loss": 1.0}
    assert read["finished_at"] == "2026-03-01T11:00:00.000000+00:00"  # UTC
    assert ManifestRow.from_mapping(read) == ManifestRow.from_mapping(row.to_dict())
    with pytest.raises(ValueError, match="status"):
        ManifestRow(asset_id="a", prompt="p", status="done")
    with pytest.raises(ValueError, match="metrics"):
        ManifestRow.from_mapping({"asset_id": "a", "prompt": "p", "status": "failed", "metrics": {"loss": "high"}})


def test_a_dataset_with_a_part_in_the_old_form_stays_readable(tmp_path):
    """A part as the current main writes it (JSON strings, ISO strings) beside a typed one: both
    read, the later row wins across forms, compaction rewrites the survivors typed, and an old
    asset.json gives its row back."""
    from pipeline.gallery import read_manifest

    (tmp_path / "manifest").mkdir()
    old = [_old_row("a-v0-1", "failed", "2026-01-01T00:00:01.000000+00:00", 9.0), _old_row("b-v0-1", "succeeded", "2026-01-01T00:00:02.000000+00:00", 0.25)]
    pq.write_table(pa.Table.from_pylist(old, schema=OLD_SCHEMA), tmp_path / "manifest" / "part-20260101T000000000000-0000aaaa.parquet")
    writer = DatasetWriter(str(tmp_path))
    writer.write_manifest([{**_old_row("a-v0-1", "succeeded", "2026-01-01T00:00:03.000000+00:00", 0.5)}])
    latest = writer.latest_rows()
    assert latest["a-v0-1"]["status"] == "succeeded" and latest["a-v0-1"]["metrics"] == {"loss": 0.5}
    assert latest["b-v0-1"]["files"] == {"preview": "assets/b-v0-1/preview.png"} and latest["b-v0-1"]["metrics"] == {"loss": 0.25}
    assert latest["b-v0-1"]["finished_at"] == "2026-01-01T00:00:02.000000+00:00"
    assert {r.asset_id: r.metrics for r in read_manifest(tmp_path)} == {"a-v0-1": {"loss": 0.5}, "b-v0-1": {"loss": 0.25}}

    assert writer.compact_manifest() == 1  # a's failed row in the old part
    parts = writer.manifest_parts()
    assert "part-20260101T000000000000-0000aaaa.parquet" not in {Path(p).name for p in parts}
    assert all(pq.read_schema(p).equals(MANIFEST_SCHEMA) for p in parts) and set(writer.latest_rows()) == {"a-v0-1", "b-v0-1"}

    # an asset.json written by the current main (its row with JSON strings) reconciles into a typed row
    folder = tmp_path / "assets" / "c-v0-1"
    folder.mkdir(parents=True)
    (folder / "asset.json").write_text(json.dumps({**_old_row("c-v0-1", "succeeded", "2026-01-01T00:00:04.000000+00:00", 0.75), "checksums": {}}))
    assert writer.read_record("c-v0-1")["files"] == {"preview": "assets/c-v0-1/preview.png"}
    assert [r["asset_id"] for r in writer.reconcile()] == ["c-v0-1"]
    assert writer.latest_rows()["c-v0-1"]["metrics"] == {"loss": 0.75}


def test_a_truncated_part_is_named_set_aside_and_its_rows_rebuilt(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    folder = tmp_path / "assets" / "a-v0-1"
    folder.mkdir(parents=True)
    row = ManifestRow.from_mapping(_old_row("a-v0-1", "succeeded", "2026-01-01T00:00:01+00:00", 0.5)).to_dict()
    (folder / "asset.json").write_text(json.dumps(row))
    part = Path(writer.write_manifest([row]))
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(DamagedPartError, match=part.name):
        writer.manifest_rows(strict=True)
    assert writer.manifest_rows() == [] and list(writer.damaged_parts) == [str(part)]
    repair = repair_manifest(writer)
    assert [(p, why.split(":")[0]) for p, _, why in repair.set_aside] == [(str(part), "ArrowInvalid")]
    assert (tmp_path / "damaged" / "manifest" / part.name).is_file()
    assert writer.latest_rows()["a-v0-1"]["metrics"] == {"loss": 0.5}


# ------------------------------------------------------------------ one digest, one asset id
def _old_identity_digest(method, models, seed) -> str:  # stages/optimize/identity.py before the one digest
    from stages.models.factory import TOYWORLD
    from stages.optimize.identity import method_identity
    from stages.toyworld.world import load_world

    payload = {"method": method_identity(method), "models": asdict(models), "seed": int(seed)}
    if any(value == TOYWORLD for value in payload["models"].values()):
        payload["toyworld"] = load_world(models.toyworld).digest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:12]


def _old_spaced(fields: dict, digits: int) -> str:  # resume (16), export (12) and eval (12) digests before
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:digits]


@pytest.mark.parametrize(
    "name, overrides",
    [("quickstart", []), ("quickstart", ["method.iterations=300", "seed=7"]), ("quickstart_tiny", []),
     ("quickstart_tiny", ["method.representation=splats", "method.loss=sds", "variants=3"]),
     ("quickstart_tiny", ["method.export.mesh_resolution=64", "method.schedule.alpha_start=0.2"])],
)
def test_ids_and_digests_of_existing_datasets_are_unchanged(name, overrides):
    from pipeline.config import load_config
    from pipeline.evaluate import eval_digest
    from pipeline.export import export_digest
    from pipeline.jobs import config_digest, make_jobs
    from stages.evaluate.config import EvaluateConfig
    from stages.optimize.config import without_runtime_keys

    config = load_config(REPO / "configs" / f"{name}.yaml", overrides)
    digest = config_digest(config)
    assert digest == _old_identity_digest(config.method, config.models, config.seed)
    for job in make_jobs(config, ["a red apple", "a chair made of avocado"]):
        key = hashlib.sha256(f"{job.prompt}\x1f{job.variant}\x1f{digest}".encode()).hexdigest()[:10]  # the id rule of main
        assert job.asset_id == f"{job.prompt.lower().replace(' ', '_')}-v{job.variant}-{key}"
    method = config.method
    assert method.resume_digest() == _old_spaced(without_runtime_keys(asdict(method)), 16)
    assert export_digest(method.export) == _old_spaced(asdict(method.export), 12)
    settings = EvaluateConfig()
    assert eval_digest(settings, "auto") == _old_spaced({**{k: v for k, v in asdict(settings).items() if k != "device"}, "views": "auto"}, 12)


# ------------------------------------------------------------------ the layout
def test_every_role_has_one_definition():
    assert len(ROLES) == len(ASSET_FILES)
    names = [name for file in ASSET_FILES for name in file.names]
    assert len(names) == len(set(names))
