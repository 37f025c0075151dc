"""deploy/: every manifest parses, names and versions agree with the project, Ray's own loaders accept them."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = ["python", "-m", "pipeline.run", "configs/dataset.yaml"]


def _yaml(relative: str) -> dict:
    return yaml.safe_load((DEPLOY / relative).read_text())


def _dockerfile_args(path: Path) -> dict[str, str]:
    """``ARG NAME=value`` defaults of a Dockerfile (quotes removed)."""
    args = {}
    for match in re.finditer(r"^ARG (\w+)=(.*)$", path.read_text(), re.M):
        args[match.group(1)] = match.group(2).strip().strip('"')
    return args


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    specs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(spec).name: Requirement(spec) for spec in specs}


def _image() -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', text).group(1)
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1)
    return f"{title}:{version}"


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_every_manifest_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "cluster-launcher/aws-gpu.yaml", "mlflow/docker-compose.yaml"}
    for path in files:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents and all(isinstance(d, dict) for d in documents), path


def test_image_name_and_versions_agree_with_the_project():
    image = _image()
    assert image == f"modedreamer-ray:{_pyproject()['project']['version']}"
    args = _dockerfile_args(DEPLOY / "Dockerfile")
    requirements = _requirements()
    for package, arg in [("torch", "TORCH_VERSION"), ("diffusers", "DIFFUSERS_VERSION"), ("transformers", "TRANSFORMERS_VERSION"),
                         ("ray", "RAY_VERSION"), ("mlflow", "MLFLOW_VERSION"), ("gsplat", "GSPLAT_VERSION")]:
        assert requirements[package].specifier.contains(args[arg]), (package, args[arg], str(requirements[package]))
    # The MLflow server runs the same MLflow as the pipeline image.
    assert _dockerfile_args(DEPLOY / "mlflow" / "Dockerfile")["MLFLOW_VERSION"] == args["MLFLOW_VERSION"]
    assert _yaml("mlflow/docker-compose.yaml")["services"]["mlflow"]["image"].endswith(":" + args["MLFLOW_VERSION"])

    cluster = _yaml("kuberay/raycluster.yaml")
    job = _yaml("kuberay/rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]  # one cluster definition, two manifests
    assert cluster["spec"]["rayVersion"] == args["RAY_VERSION"]
    for container in _containers(cluster["spec"]):
        assert container["image"] == image
        assert container["workingDir"] == "/app"
    assert _yaml("cluster-launcher/aws-gpu.yaml")["docker"]["image"].endswith(image)
    assert f"-t {image}" in (DEPLOY / "README.md").read_text()


def test_dockerfile_installs_the_project_where_the_entrypoint_runs():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", text, re.M)
    sources = [m.group(1).split() for m in re.finditer(r"^COPY (?!--from)(.+?)\s+\S+$", text, re.M)]
    copied = {s for group in sources for s in group}
    assert {"pyproject.toml", "stages", "pipeline", "configs"} <= copied
    for source in copied:
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which is not in the repository"
    assert re.search(r'TORCH_CUDA_ARCH_LIST="[0-9.;]+"', text) and re.search(r'TCNN_CUDA_ARCHITECTURES="[0-9;]+"', text)


def test_rayjob_entrypoint_runs_the_pipeline_on_an_object_store():
    words = shlex.split(_yaml("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert words[:4] == ENTRYPOINT
    overrides = dict(word.split("=", 1) for word in words[4:])
    assert overrides["output"].startswith("s3://")
    assert overrides["tracking.tracking_uri"].startswith("http")
    assert " ".join(ENTRYPOINT) in (DEPLOY / "README.md").read_text()


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_entrypoint_config_fits_the_gpu_worker_group():
    """The config the RayJob runs exists, and what it asks per actor/task fits one worker pod and in total the group."""
    path = ROOT / ENTRYPOINT[-1]
    if not path.exists():
        pytest.skip(f"{ENTRYPOINT[-1]} not written yet (owned by the pipeline)")
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict) and config.get("prompts"), f"{path} has no prompts"
    group = _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod_gpus, pod_cpus = _quantity(limits["nvidia.com/gpu"]), _quantity(limits["cpu"])
    resources = config.get("resources", {})
    actors = [resources.get(name, {}) for name in ("reference", "ip", "mvd")]
    for actor in actors:
        assert actor.get("num_gpus", 0) <= pod_gpus and actor.get("num_cpus", 0) <= pod_cpus
    assert resources.get("task_num_gpus", 0) <= pod_gpus and resources.get("task_num_cpus", 1) <= pod_cpus
    wanted_gpus = sum(a.get("replicas", 1) * a.get("num_gpus", 0) for a in actors)
    wanted_gpus += resources.get("tasks_in_flight", 4) * resources.get("task_num_gpus", 0)
    assert wanted_gpus <= group["maxReplicas"] * pod_gpus, f"{path} asks {wanted_gpus} GPUs in total"


def test_kuberay_cluster_with_rays_own_loader():
    loader = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    derive = getattr(loader, "_derive_autoscaling_config_from_ray_cr", None)
    if derive is None:
        pytest.skip("ray has no _derive_autoscaling_config_from_ray_cr")
    cluster = _yaml("kuberay/raycluster.yaml")
    job = _yaml("kuberay/rayjob.yaml")
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    for resource in (cluster, {"metadata": job["metadata"], "spec": job["spec"]["rayClusterSpec"]}):
        config = derive(copy.deepcopy(resource))  # runs ray's validate_config on the result
        head = config["available_node_types"]["headgroup"]
        assert head["resources"].get("CPU", 0) == 0 and head["resources"].get("GPU", 0) == 0
        gpu = config["available_node_types"]["gpu"]
        assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 8
        assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)


def test_cluster_launcher_config_with_rays_own_loader():
    util = pytest.importorskip("ray.autoscaler._private.util")
    jsonschema = pytest.importorskip("jsonschema")
    raw = _yaml("cluster-launcher/aws-gpu.yaml")
    config = util.prepare_config(copy.deepcopy(raw))
    util.validate_config(config)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu"]["max_worker"] = 8  # typo: the schema must refuse it
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(broken))


def test_mlflow_compose_binds_localhost_and_uses_postgres_and_s3():
    compose = _yaml("mlflow/docker-compose.yaml")
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"service {name} publishes {port} beyond localhost"
    assert "ports" not in services["postgres"]
    command = services["mlflow"]["command"]
    assert "--app-name=basic-auth" in command
    assert any(arg.startswith("--backend-store-uri=postgresql://") and "@postgres:" in arg for arg in command)
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in command)
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # Every variable the compose file reads is documented in env.example.
    used = set(re.findall(r"\$\{(\w+)", (DEPLOY / "mlflow" / "docker-compose.yaml").read_text()))
    documented = set(re.findall(r"^(\w+)=", (DEPLOY / "mlflow" / "env.example").read_text(), re.M))
    assert used <= documented, used - documented


def test_readme_covers_every_deploy_file_and_the_security_notes():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.relative_to(DEPLOY).as_posix() in readme, f"deploy/README.md does not mention {path.name}"
    for phrase in ("RAY_AUTH_MODE=token", "port-forward", "127.0.0.1", "MLFLOW_TRACKING_URI", "basic-auth", "s3://"):
        assert phrase in readme, phrase
