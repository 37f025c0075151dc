"""Config validation, prompt sources, asset ids and the dataset writer (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.capacity import capacity_note, check_resources, tasks_that_fit
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.jobs import asset_id_for, config_digest, make_jobs
from pipeline.prompts import PromptsConfig, read_prompts
from pipeline.writer import MANIFEST_COLUMNS, DatasetWriter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hub_reachable(monkeypatch):
    """These configs name hub models (the shipped defaults); with HF_HUB_OFFLINE set, loading
    them checks the local cache and refuses. Loading a config never downloads, so drop it here."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
prompts:
  inline: ["a red apple", "a blue chair"]
output: {out}
"""


def test_shipped_configs_load_and_overrides_apply(tmp_path):
    for name in ("quickstart.yaml", "quickstart_tiny.yaml", "dataset.yaml", "t3bench_single.yaml", "t3bench_multi.yaml", "t3bench_surr.yaml", "gpteval3d.yaml"):
        config = load_config(REPO / "configs" / name, [f"output={tmp_path}"])
        assert isinstance(config, PipelineConfig)
    config = load_config(REPO / "configs" / "dataset.yaml", ["variants=4", "method.iterations=3000", f"output={tmp_path}"])
    assert config.variants == 4 and config.method.iterations == 3000
    prompts = read_prompts(config.prompts)
    expected = [line.strip() for line in (REPO / "configs/prompts/t3bench_single.txt").read_text().splitlines() if line.strip()]
    assert prompts[: len(expected)] == expected


@pytest.mark.parametrize(
    "override, key",
    [
        ("variantz=3", "variantz"),
        ("method.iterationz=3", "method.iterationz"),
        ("variants=many", "variants"),
        ("resources.ip.max_batch=0", "resources.ip.max_batch"),
        ("resources.task_num_gpus=1.5", "resources.task_num_gpus"),
        ("variants=0", "variants"),
        ("method.loss=nope", "method.loss"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key):
    path = write_config(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert key in str(info.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = write_config(tmp_path, BASE.format(out=tmp_path / "out") + "resources:\n  gpus_per_task: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "resources.gpus_per_task" in str(info.value) and str(path) in str(info.value)


def test_missing_and_empty_prompt_files_are_named(tmp_path):
    path = write_config(tmp_path, f"prompts:\n  sources: [{{path: nothere.txt}}]\noutput: {tmp_path}\n")
    with pytest.raises(ConfigError, match="nothere.txt"):
        load_config(path)
    (tmp_path / "empty.txt").write_text("\n# only a comment\n\n")
    path = write_config(tmp_path, f"prompts:\n  sources: [{{path: empty.txt}}]\noutput: {tmp_path}\n")
    with pytest.raises(ConfigError, match="empty.txt.*empty"):
        load_config(path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    path = write_config(tmp_path, f"prompts:\n  sources: [{{path: bad.jsonl}}]\noutput: {tmp_path}\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        load_config(path)
    path = write_config(tmp_path, f"prompts:\n  inline: []\noutput: {tmp_path}\n")
    with pytest.raises(ConfigError, match="prompts"):
        load_config(path)


def test_prompt_formats_read_back(tmp_path):
    prompts = ["a cat, sitting", 'a "quoted" hat', "a tree"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "x": 1}) for p in prompts))
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([[i, p] for i, p in enumerate(prompts)])
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    sources = "\n".join(
        f"    - {{path: {name}{extra}}}"
        for name, extra in [("p.txt", ""), ("p.jsonl", ""), ("p.json", ""), ("p.csv", ", column: text"), ("p.parquet", "")]
    )
    path = write_config(tmp_path, f"prompts:\n  sources:\n{sources}\n  inline: ['extra one']\noutput: {tmp_path}/o\n")
    config = load_config(path)
    for source in config.prompts.sources:
        assert read_prompts(PromptsConfig(sources=[source])) == prompts, source.path
    assert read_prompts(config.prompts) == prompts + ["extra one"]


def test_asset_ids_are_deterministic_and_distinct(tmp_path):
    path = write_config(tmp_path, BASE.format(out=tmp_path / "out"))
    a = make_jobs(load_config(path, ["variants=3"]), ["a red apple", "A Red Apple!"])
    b = make_jobs(load_config(path, ["variants=3"]), ["a red apple", "A Red Apple!"])
    assert [j.asset_id for j in a] == [j.asset_id for j in b]
    assert len({j.asset_id for j in a}) == 6
    assert len({j.reference_seed for j in a}) == 6
    assert all(j.asset_id.replace("-", "").replace("_", "").isalnum() for j in a)
    changed = load_config(path, ["variants=3", "method.iterations=7"])
    assert config_digest(changed) != a[0].config_digest
    assert asset_id_for("a red apple", 0, config_digest(changed)) != a[0].asset_id
    # resources, export settings and runtime keys do not change the assets
    for unchanged in ("resources.tasks_in_flight=9", "method.export.mesh_threshold=2.5", "method.export.turntable_frames=7",
                      "method.checkpoint_every=3", "method.preview_every=0", "method.device=cpu",
                      "method.backprop=direct", "method.nerf.renderer.chunk_samples=4096", "method.splats.chunk_views=2"):
        assert config_digest(load_config(path, ["variants=3", unchanged])) == a[0].config_digest, unchanged


def test_the_one_asset_cli_names_an_asset_as_the_pipeline_does(tmp_path):
    """``python -m stages.optimize --config <pipeline yaml> --variant k`` makes the asset the dataset
    run names for that prompt's variant k: same id, same seeds (one rule, stages.optimize.identity)."""
    from stages.optimize.__main__ import build_configs, parse_args
    from stages.optimize.identity import asset_id_for, derived_seed, identity_digest

    repo = Path(__file__).resolve().parents[1]
    quickstart = repo / "configs" / "quickstart.yaml"
    jobs = make_jobs(load_config(quickstart, [f"output={tmp_path}"]), ["a ceramic teapot"])
    args = parse_args(["--prompt", "a ceramic teapot", "--config", str(quickstart), "--variant", "1"])
    method, models = build_configs(args)
    assert asset_id_for(args.prompt, 1, identity_digest(method, models, args.seed)) == jobs[1].asset_id
    assert derived_seed(args.seed, args.prompt, 1, "optimize") == jobs[1].seed
    assert derived_seed(args.seed, args.prompt, 1, "reference") == jobs[1].reference_seed


def test_impossible_resources_name_the_key(tmp_path):
    config = load_config(write_config(tmp_path, BASE.format(out=tmp_path)), ["resources.ip.num_gpus=1"])
    with pytest.raises(ConfigError, match="resources.ip.num_gpus"):
        check_resources(config, {"CPU": 2.0}, ("ip",))
    config = load_config(write_config(tmp_path, BASE.format(out=tmp_path)), ["resources.task_num_cpus=4"])
    with pytest.raises(ConfigError, match="resources.task_num_cpus"):
        check_resources(config, {"CPU": 2.0}, ("ip",))
    check_resources(load_config(write_config(tmp_path, BASE.format(out=tmp_path))), {"CPU": 2.0}, ("ip", "mvd"))


def test_shipped_gpu_configs_run_all_their_tasks_on_one_gpu():
    """16 tasks of 1/64 GPU beside three 1/4-GPU actors fill exactly one GPU: no note."""
    for name in ("dataset", "t3bench_single", "t3bench_surr", "t3bench_multi", "gpteval3d", "eval_t3bench"):
        config = load_config(REPO / "configs" / f"{name}.yaml")
        cluster = {"CPU": 16.0, "GPU": 1.0}
        assert tasks_that_fit(config, cluster, ("reference", "ip", "mvd")) == config.resources.tasks_in_flight == 16, name
        assert capacity_note(config, cluster, ("reference", "ip", "mvd")) is None


def test_capacity_note_says_how_many_tasks_fit_and_which_keys_decide(tmp_path):
    path = write_config(tmp_path, BASE.format(out=tmp_path))
    # GPU-bound: 1 − 3·0.25 = 0.25 GPU left, 0.0625 per task → 4 of 16.
    gpu = ["resources.tasks_in_flight=16", "resources.task_num_cpus=1", "resources.task_num_gpus=0.0625"]
    gpu += [f"resources.{k}.num_gpus=0.25" for k in ("reference", "ip", "mvd")]
    config = load_config(path, gpu)
    assert tasks_that_fit(config, {"CPU": 32.0, "GPU": 1.0}, ("reference", "ip", "mvd")) == 4
    note = capacity_note(config, {"CPU": 32.0, "GPU": 1.0}, ("reference", "ip", "mvd"))
    assert note and "fits 4 of resources.tasks_in_flight=16" in note and "resources.task_num_gpus=0.0625" in note
    # only the actors the method uses reserve anything: without the reference actor 0.5 GPU → 8
    assert tasks_that_fit(config, {"CPU": 32.0, "GPU": 1.0}, ("ip", "mvd")) == 8
    # CPU-bound: 8 CPUs, actors reserve 1 each (3), 2 per task → 2 (5 // 2)
    cpu = ["resources.tasks_in_flight=8", "resources.task_num_cpus=2"] + [f"resources.{k}.num_cpus=1" for k in ("reference", "ip", "mvd")]
    assert tasks_that_fit(load_config(path, cpu), {"CPU": 8.0}, ("reference", "ip", "mvd")) == 2
    # the quickstart's 4 tasks of half a core fit 2 cores
    quickstart = load_config(REPO / "configs" / "quickstart.yaml")
    assert capacity_note(quickstart, {"CPU": 2.0}, ("reference", "ip", "mvd")) is None


def _row(asset_id: str, status: str, finished: str) -> dict:
    return {"asset_id": asset_id, "prompt": "p", "status": status, "finished_at": finished, "files": {"a": "b"}}


def test_manifest_shards_supersede_and_read_with_pyarrow_dataset(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    writer.write_manifest([_row("x", "failed", "2026-01-01T00:00:00"), _row("y", "succeeded", "2026-01-01T00:00:01")])
    writer.write_manifest([_row("x", "succeeded", "2026-01-02T00:00:00")])
    assert not list((tmp_path / "manifest").glob(".*"))  # no temp files left
    import pyarrow.dataset as ds

    table = ds.dataset(tmp_path / "manifest", format="parquet").to_table()
    assert table.num_rows == 3 and tuple(table.column_names) == MANIFEST_COLUMNS
    assert pa.types.is_map(table.schema.field("files").type) and pa.types.is_timestamp(table.schema.field("finished_at").type)
    latest = writer.latest_rows()
    assert latest["x"]["status"] == "succeeded" and latest["y"]["files"] == {"a": "b"}


def test_commit_is_atomic_first_wins_and_reconcile_restores_rows(tmp_path):
    writer = DatasetWriter(f"file://{tmp_path}")
    staged = writer.staging_dir("a1")
    (staged / "x.txt").write_text("first")
    with pytest.raises(ValueError, match="asset.json"):
        writer.commit("a1", staged)  # no record: not an asset
    staged = writer.staging_dir("a1")
    (staged / "x.txt").write_text("first")
    (staged / "asset.json").write_text(json.dumps(_row("a1", "succeeded", "2026-01-01T00:00:01")))
    assert writer.commit("a1", staged) and not staged.exists()
    second = writer.staging_dir("a1")
    (second / "x.txt").write_text("second")
    (second / "asset.json").write_text(json.dumps(_row("a1", "succeeded", "2026-01-01T00:00:02")))
    assert not writer.commit("a1", second) and not second.exists()
    assert (tmp_path / "assets/a1/x.txt").read_text() == "first"
    assert writer.committed_ids() == {"a1"}
    # the driver died before writing the row: reconcile writes it from asset.json, once
    assert [r["asset_id"] for r in writer.reconcile()] == ["a1"]
    assert writer.reconcile() == []
    assert writer.latest_rows()["a1"]["finished_at"] == "2026-01-01T00:00:01.000000+00:00"  # naive times are UTC


def test_run_cli_takes_overrides_around_flags():
    from pipeline.run import parse_args

    args = parse_args(["configs/dataset.yaml", "variants=2", "--retry-failed", "method.iterations=3"])
    assert args.config == "configs/dataset.yaml" and args.retry_failed
    assert args.overrides == ["variants=2", "method.iterations=3"]


QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, capsys):
    import ray

    from pipeline.run import main

    out = tmp_path / "dataset"
    ray_was_up = ray.is_initialized()
    assert main([QUICKSTART, f"output={out}", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "dry run: 4 prompts x 2 variants = 8 assets" in err
    assert err.count("would run ") == 8 and "'a spinning top'" in err
    assert not out.exists() and ray.is_initialized() == ray_was_up

    # an asset recorded as failed is kept unless --retry-failed
    config = load_config(REPO / "configs" / "quickstart.yaml", [f"output={out}"])
    failed = make_jobs(config, read_prompts(config.prompts))[3]
    DatasetWriter(str(out)).write_manifest([{**_row(failed.asset_id, "failed", "2026-01-01T00:00:00"), "prompt": failed.prompt}])
    assert main([QUICKSTART, f"output={out}", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "1 failed earlier" in err and "7 to run" in err and failed.asset_id not in err
    assert main([QUICKSTART, f"output={out}", "--dry-run", "--retry-failed"]) == 0
    assert failed.asset_id in capsys.readouterr().err


def test_dry_run_still_rejects_a_bad_key(tmp_path, capsys):
    from pipeline.run import main

    assert main([QUICKSTART, f"output={tmp_path}", "variantz=3", "--dry-run"]) == 2
    assert "variantz" in capsys.readouterr().err


def test_cuda_device_without_a_gpu_share_names_the_key(tmp_path):
    path = write_config(tmp_path, BASE.format(out=tmp_path))
    with pytest.raises(ConfigError, match=r"resources.task_num_gpus.*Ray hides the GPUs.*method.device=cuda"):
        load_config(path, ["method.device=cuda"])
    with pytest.raises(ConfigError, match=r"resources.mvd.num_gpus.*models.device=cuda:0"):
        load_config(path, ["models.device=cuda:0", "resources.reference.num_gpus=0.1", "resources.ip.num_gpus=0.1"])
    # with shares everywhere the method needs, cuda is accepted (the cluster check comes later)
    shares = [f"resources.{k}.num_gpus=0.25" for k in ("reference", "ip", "mvd")] + ["resources.task_num_gpus=0.25"]
    load_config(path, ["method.device=cuda", "models.device=cuda", *shares])


def test_parts_left_on_the_cpu_of_a_gpu_cluster_are_noted(tmp_path):
    from pipeline.capacity import cpu_fallback_notes

    config = load_config(write_config(tmp_path, BASE.format(out=tmp_path)), ["resources.ip.num_gpus=0.5"])
    needed = ("reference", "ip", "mvd")
    notes = cpu_fallback_notes(config, {"CPU": 8.0, "GPU": 2.0}, needed)
    keys = sorted(note.split("=")[0] for note in notes)
    assert keys == ["resources.mvd.num_gpus", "resources.reference.num_gpus", "resources.task_num_gpus"]
    assert all("although the cluster has 2 GPUs" in note for note in notes)
    assert cpu_fallback_notes(config, {"CPU": 8.0}, needed) == []  # no GPUs: nothing to say


def test_choice_keys_name_the_full_key_and_the_allowed_values(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    path = write_config(tmp_path, f"prompts:\n  sources: [{{path: p.txt, format: docx}}]\noutput: {tmp_path}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "prompts.sources[0].format" in message and "txt, jsonl" in message
    for override, key in (("method_preset=huge", "method_preset"), ("models.dtype=int8", "models.dtype"), ("method.export.video_format=avi", "method.export.video_format")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(write_config(tmp_path, BASE.format(out=tmp_path)), [override])


TOY_MODELS = [f"models.{k}=toyworld" for k in ("sd", "ip_adapter", "image_encoder", "mvdream", "mvdream_text", "reference")]


def test_a_prompt_the_toy_world_lacks_is_refused_with_its_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ring\n# a comment\n\na purple chair\n")
    path = write_config(tmp_path, f"prompts:\n  sources: [{{path: {prompts}}}]\noutput: {tmp_path / 'out'}\n")
    with pytest.raises(ConfigError, match=r"prompts\.txt:4: prompt 'a purple chair' is not in the toy world"):
        load_config(path, TOY_MODELS)
    path = write_config(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"prompts\.inline\[0\]'?: prompt 'a red apple' is not in the toy world"):
        load_config(path, TOY_MODELS)
    # the same prompts are fine for real models (nothing checks them against a world)
    load_config(path, ["models.sd=tiny"])


def test_toy_world_keys_of_one_model_go_together_and_the_world_file_is_named(tmp_path):
    path = write_config(tmp_path, 'prompts:\n  inline: ["a ring"]\n' + f"output: {tmp_path / 'out'}\n")
    with pytest.raises(ConfigError, match=r"models\.ip_adapter='h94/IP-Adapter' but models\.sd=toyworld"):
        load_config(path, ["models.sd=toyworld"])
    with pytest.raises(ConfigError, match=r"models\.toyworld.*world file not found: nowhere\.yaml"):
        load_config(path, [*TOY_MODELS, "models.toyworld=nowhere.yaml"])
    world = tmp_path / "world.yaml"
    world.write_text("prompts:\n  a ring:\n    objects: [{parts: [{shape: torus, radius: 0.3, thickness: 0.1}]}]\n")
    config = load_config(path, [*TOY_MODELS, "models.toyworld=world.yaml"])  # relative to the config file
    assert config.models.toyworld == str(world.resolve())
    # the world's content is part of the assets' config digest
    before = make_jobs(config, ["a ring"])[0].asset_id
    world.write_text("prompts:\n  a ring:\n    objects: [{parts: [{shape: torus, radius: 0.35, thickness: 0.1}]}]\n")
    assert make_jobs(config, ["a ring"])[0].asset_id != before


def test_preflight_takes_toyworld_as_a_model_source_and_names_a_bad_world_file(tmp_path):
    """``pipeline.preflight.check_models`` (also run by tools that skip the prompt check) resolves
    ``toyworld`` without weights and loads the world file, naming it when it does not load."""
    from pipeline.preflight import PreflightError, check_models
    from stages.models.config import ModelsConfig

    toy = {k.split("=")[0].removeprefix("models."): "toyworld" for k in TOY_MODELS}
    check_models(ModelsConfig(**toy), ("reference", "ip", "mvd"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("prompts:\n  a ring:\n    objects: [{parts: [{shape: pyramid}]}]\n")
    with pytest.raises(PreflightError, match=r"'models\.toyworld' \(the world of models\.reference=toyworld\): .*broken\.yaml"):
        check_models(ModelsConfig(**toy, toyworld=str(broken)), ("reference", "ip", "mvd"))
    check_models(ModelsConfig(**toy, toyworld=str(broken)), ())  # no model of this tool loads it
