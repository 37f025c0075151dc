"""The GPU memory plan of a dataset config: sums, Ray's packing, the shipped configs against an
80 GB card, the fork point (e009dc1) that did not fit, and the driver refusing before any model
loads. The optimiser task's figures come through ``task_memory``; here a stand-in with known
bytes is injected (the real one, ``stages.optimize.memory.task_memory``, is used where present)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.memory import fork_point
from pipeline.config import ConfigError, load_config
from pipeline.memory_plan import CONTEXT_BYTES, GIB, check_plan, default_task_memory, format_plan, plan_memory
from stages.guidance.memory import TABLE, load_table

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ("dataset", "dataset_8gpu", "t3bench_single", "t3bench_surr", "t3bench_multi", "gpteval3d", "eval_t3bench")
CARD = 80 * GIB
BUDGET = 0.9 * CARD  # 10 % headroom


@dataclass
class StandInPhase:
    """The fields the plan reads from ``stages.optimize.memory.TaskMemory`` (bytes)."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    frame_bytes: int
    graph_bytes: int
    peak_bytes: int


def stand_in(total_gib: tuple[float, ...]):
    def task_memory(method):
        assert len(total_gib) == len(method.schedule.batch_sizes)
        mib = 1 << 20
        return [StandInPhase(64 * mib, 64 * mib, 128 * mib, 8 * mib, int(t * GIB) - 264 * mib, int(t * GIB)) for t in total_gib]

    return task_memory


def entry(key_prefix: str) -> int:
    """weights + activations of the shipped table's entry whose key starts with ``key_prefix``."""
    value = next(v for k, v in load_table(TABLE).items() if k.startswith(key_prefix))
    return value["weights"] + value["activations"]


def test_plan_adds_each_process_with_its_context_and_counts_tasks_at_their_largest_phase():
    config = load_config(REPO / "configs" / "dataset.yaml", check_models=False)
    plan = plan_memory(config, task_memory=stand_in((1.0, 2.5)))
    assert plan.complete and len(plan.gpus) == 1 and len(plan.gpus[0]) == 3 + 16
    reference = entry("reference|sd15|float16|4 images")
    ip = max(entry("ip|sd15+ip-base+vit-h14|float16|isd/vanilla|8x8 views@64->512|vae_chunk 4|unet_rows 16"),
             entry("ip|sd15+ip-base+vit-h14|float16|isd/vanilla|16x4 views@256->512|vae_chunk 4|unet_rows 16"))
    mvd = max(entry("mvd|mvdream-sd21-4view|float16|sds_mvd|8x8 views@64->256|vae_chunk 8|unet_rows 16"),
              entry("mvd|mvdream-sd21-4view|float16|sds_mvd|8x4 views@256->256|vae_chunk 8|unet_rows 16"))
    expected = reference + ip + mvd + 16 * int(2.5 * GIB) + 19 * CONTEXT_BYTES
    assert plan.gpu_totals() == [expected]
    assert [p.label for p in plan.task_phases] == ["phase 1: 8 views at 64²", "phase 2: 4 views at 256²"]
    text = format_plan(plan, CARD)
    assert "optimiser task" in text and "16" in text and "fits" in text
    assert "measured" not in text  # every actor figure came from the shipped table


def test_plan_without_task_memory_is_a_lower_bound_and_says_so():
    config = load_config(REPO / "configs" / "dataset.yaml", check_models=False)
    plan = plan_memory(config, task_memory=None)
    assert not plan.complete and any("task_memory is missing" in note for note in plan.notes)
    with_tasks = plan_memory(config, task_memory=stand_in((0.0, 0.0)))
    assert plan.gpu_totals() == with_tasks.gpu_totals()  # contexts counted either way


def test_eight_gpu_config_places_one_ip_and_one_mvdream_replica_per_gpu_as_ray_does():
    config = load_config(REPO / "configs" / "dataset_8gpu.yaml", check_models=False)
    plan = plan_memory(config, task_memory=stand_in((1.0, 1.0)), gpus=8)
    kinds = [sorted(p.kind for p in gpu) for gpu in plan.gpus]
    assert kinds[0] == ["ip", "mvd", "reference", "reference"]
    for gpu in kinds[1:]:
        assert gpu == ["ip", "mvd"] + ["task"] * 16
    assert sum(len(g) for g in plan.gpus) == 2 + 8 + 8 + 112


def test_best_fit_packing_follows_ray_not_first_fit():
    """Ray puts a fraction on the GPU where it fits best: with 0.6 and 0.3 placed, a 0.3 request
    lands beside the 0.6 (0.1 left) rather than the 0.3 (0.4 left)."""
    config = load_config(
        REPO / "configs" / "dataset.yaml",
        ["resources.reference.num_gpus=0.6", "resources.ip.num_gpus=0.5", "resources.mvd.num_gpus=0.3",
         "resources.task_num_gpus=0.00625"],
        check_models=False,
    )
    plan = plan_memory(config, task_memory=stand_in((1.0, 1.0)))
    # reference 0.6 → GPU 0; ip 0.5 does not fit beside it → GPU 1; mvd 0.3 best fits GPU 0
    # (0.1 left) over GPU 1 (0.2 left); the 16 tasks (0.1 together) fill GPU 0's last 0.1.
    assert [[p.kind for p in gpu] for gpu in plan.gpus] == [["reference", "mvd"] + ["task"] * 16, ["ip"]]


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_leave_each_task_at_least_2_5_gib_of_an_80gb_card(name):
    """The actors of every shipped GPU config, with every process' CUDA context, leave each
    optimiser task of the busiest GPU at least 2.5 GiB within a 10 % headroom of 80 GiB: the
    budget ``task_memory`` must meet for the whole plan to fit."""
    config = load_config(REPO / "configs" / f"{name}.yaml", check_models=False)
    plan = plan_memory(config, task_memory=None)
    assert plan.notes == ["optimiser tasks: memory not modelled (stages.optimize.memory.task_memory is missing), "
                          "only their CUDA contexts are counted: GPU sums are lower bounds"]
    for gpu, total in zip(plan.gpus, plan.gpu_totals()):
        tasks = sum(p.kind == "task" for p in gpu)
        assert total <= BUDGET
        if tasks:
            assert (BUDGET - total) / tasks >= 2.5 * GIB, (name, (BUDGET - total) / tasks / GIB)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_fit_an_80gb_card_with_10_percent_headroom(name):
    """The whole plan, optimiser tasks included (``stages.optimize.memory.task_memory``)."""
    if default_task_memory() is None:
        pytest.skip("stages.optimize.memory.task_memory is not merged yet")
    plan = plan_memory(load_config(REPO / "configs" / f"{name}.yaml", check_models=False))
    assert plan.complete
    assert max(plan.gpu_totals()) <= BUDGET, format_plan(plan, CARD)


def test_the_fork_point_plan_of_dataset_yaml_did_not_fit():
    """As e009dc1 ran configs/dataset.yaml (one VAE pass with every encoder graph alive and one
    UNet forward per batch of 16 eight-view requests): the IP actor alone passes 80 GiB."""
    config = load_config(REPO / "configs" / "dataset.yaml", check_models=False)
    before = plan_memory(fork_point(config), task_memory=None)
    ip = next(p for p in before.gpus[0] if p.kind == "ip")
    assert ip.peak > CARD and "16x8 views" in ip.detail and "vae_chunk none" in ip.detail
    with pytest.raises(ConfigError, match=r"GPU 0 needs \d+\.\d GiB at least .*resources\.ip\.vae_chunk"):
        check_plan(before, CARD, 0.1)
    check_plan(plan_memory(config, task_memory=None), CARD, 0.1)


def test_a_plan_that_cannot_fit_names_the_keys_to_change():
    config = load_config(REPO / "configs" / "dataset.yaml", ["resources.gpu_memory_gib=24"], check_models=False)
    plan = plan_memory(config, task_memory=stand_in((1.0, 1.5)))
    with pytest.raises(ConfigError) as error:
        check_plan(plan, 24 * GIB, config.resources.gpu_memory_headroom, "resources.gpu_memory_gib")
    message = str(error.value)
    for key in ("resources.tasks_in_flight", "resources.ip.vae_chunk", "resources.ip.unet_rows", "resources.task_num_gpus",
                "resources.ip.num_gpus", "resources.gpu_memory_headroom=0.1", "resources.gpu_memory_gib",
                "method.nerf.renderer.chunk_samples"):
        assert key in message
    assert "16 x optimiser task 2.0 GiB" in message  # 1.5 GiB + its CUDA context


def test_dry_run_prints_the_plan_and_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    import pipeline.memory_plan as memory_plan
    from pipeline.run import main

    monkeypatch.setattr(memory_plan, "default_task_memory", lambda: stand_in((1.0, 2.0)))
    args = [str(REPO / "configs" / "dataset.yaml"), f"output={tmp_path}", "--dry-run"]
    # offline, the hub models are not in this machine's cache: the plan needs no weights, so it
    # is printed and checked all the same, and the missing model is named beside it
    assert main(args + ["resources.gpu_memory_gib=80"]) == 2
    err = capsys.readouterr().err
    assert "memory plan" in err and "IP guidance" in err and "fits" in err and "error: config key models.reference" in err
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online hub ids are resolved when loaded
    assert main(args + ["resources.gpu_memory_gib=80"]) == 0
    err = capsys.readouterr().err
    assert "memory plan" in err and "IP guidance" in err and "MVDream guidance" in err and "fits" in err
    assert main(args + ["resources.gpu_memory_gib=40"]) == 2
    err = capsys.readouterr().err
    assert "DOES NOT FIT" in err and "error: memory plan: GPU 0 needs" in err and "resources.tasks_in_flight" in err
    assert not (tmp_path / "manifest").exists()


def test_the_run_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """``run_dataset`` checks the plan right after the cluster's resources: no actor is created,
    no factory called, nothing written but the (empty) staging area."""
    import pipeline.memory_plan as memory_plan
    import pipeline.run as run
    from pipeline.components import Components

    def boom(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(memory_plan, "default_task_memory", lambda: stand_in((1.0, 2.0)))
    monkeypatch.setattr(run, "connect_ray", lambda config, stream=None: None)
    monkeypatch.setattr(run.ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 1.0})
    monkeypatch.setattr(run, "build_graph", boom)
    config = load_config(
        REPO / "configs" / "dataset.yaml", [f"output={tmp_path}", "resources.gpu_memory_gib=40", "tracking.enabled=false"], check_models=False
    )
    components = Components(optimize=boom, export=boom, ip_guidance=boom, mvd_guidance=boom, reference_sampler=boom)
    with pytest.raises(ConfigError, match=r"memory plan: GPU 0 needs .* has 40\.0 GiB \(resources\.gpu_memory_gib\)"):
        run.run_dataset(config, components, stream=io.StringIO())
    stream = io.StringIO()
    config.resources.gpu_memory_gib = 80.0
    monkeypatch.setattr(run, "build_graph", lambda *a: (_ for _ in ()).throw(RuntimeError("graph")))
    with pytest.raises(RuntimeError, match="graph"):  # the plan passed; the run went on to build the graph
        run.run_dataset(config, components, stream=stream)
    assert "memory plan: up to" in stream.getvalue() and "of 80.0 GiB (resources.gpu_memory_gib)" in stream.getvalue()


def test_the_plan_needs_no_weights_but_names_a_model_source_that_cannot_be_resolved(tmp_path, capsys, monkeypatch):
    """Hub ids resolve to their known architecture without a download (the shipped table answers);
    a local path that does not exist is refused with its key."""
    from pipeline.run import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online hub ids are resolved when loaded

    config = str(REPO / "configs" / "dataset.yaml")
    assert main([config, f"output={tmp_path}", "--dry-run", "resources.gpu_memory_gib=80", "models.sd=someone/sd15-finetune"]) == 0
    assert "IP guidance" in capsys.readouterr().err
    assert main([config, f"output={tmp_path}", "--dry-run", f"models.mvdream={tmp_path / 'missing'}"]) == 2
    assert "error: memory plan: models.mvdream:" in capsys.readouterr().err
