"""The YAML (and Dockerfile) in cluster/: they parse, name real modules and files, and keep the cluster private.

No cluster is started: these read the files only (and Ray's own launcher schema and runtime-env packer).
"""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

import cluster

CLUSTER = Path(cluster.__file__).parent
REPO = CLUSTER.parent
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = YAML_FILES + [CLUSTER / "Dockerfile", CLUSTER / "README.md"]
REPO_PACKAGES = ("pipelines", "jobs", "deploy", "cluster", "tests")
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(REPO_PACKAGES) + r")/[\w./-]*[\w/])")


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _walk(value):
    """Every string in a parsed YAML document; a list of strings also as one space-joined command line."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        if value and all(isinstance(item, str) for item in value):
            yield " ".join(value)
        for item in value:
            yield from _walk(item)
    elif isinstance(value, str):
        yield value
        if "\n" in value and ":" in value:  # an embedded YAML document (RayJob.runtimeEnvYAML)
            try:
                yield from _walk(yaml.safe_load(value))
            except yaml.YAMLError:
                pass


def _strings(path: Path) -> list[str]:
    if path.suffix in (".yaml", ".yml"):
        return [s for doc in yaml.safe_load_all(path.read_text()) for s in _walk(doc)]
    return [path.read_text()]


def _kuberay_cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of raycluster.yaml and the one the RayJob creates."""
    return {
        "raycluster.yaml": _load("kuberay/raycluster.yaml")["spec"],
        "rayjob.yaml": _load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"],
        "rayservice.yaml": _load("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _containers(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def test_the_expected_manifests_exist():
    """Guards a renamed or deleted manifest that the README and the other tests rely on."""
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {
        "launcher.yaml",
        "runtime_env.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/rayservice.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses_into_mappings(path):
    """A YAML syntax slip (tab, bad indent, unresolved anchor) fails here, not on `kubectl apply` or `ray up`."""
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


def test_kuberay_kinds_and_api_versions():
    """KubeRay's CRDs are ray.io/v1; an old v1alpha1 or a misspelled kind is rejected by the API server."""
    kinds = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion {doc['apiVersion']!r}"
            kinds[path.name] = doc["kind"]
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


def test_launcher_config_passes_rays_own_schema():
    """`ray up` validates the config with this same code: unknown keys or wrong types fail before any VM starts."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load("launcher.yaml")))


def test_launcher_has_a_cpu_head_and_a_gpu_worker_type_scaling_from_zero():
    """The head does no GPU work; GPU workers are launched only on demand (min_workers 0) and are bounded."""
    config = _load("launcher.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 0) > 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert len(gpu_types) == 1, f"expected one GPU worker type, got {sorted(gpu_types)}"
    (gpu,) = gpu_types.values()
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= config["max_workers"]


def test_kuberay_cpu_head_and_autoscaled_gpu_workers():
    """Same shape on Kubernetes: no GPU on the head pod, a GPU group scaling from 0, the autoscaler on."""
    for name, spec in _kuberay_cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0" and float(head["rayStartParams"]["num-cpus"]) > 0, name
        for container in _containers(head["template"]):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), name
        (group,) = spec["workerGroupSpecs"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, name
        (worker,) = group["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name


def test_token_authentication_is_on_everywhere():
    """Without RAY_AUTH_MODE=token on every `ray start` (or authOptions on KubeRay) anyone reaching a port runs code."""
    config = _load("launcher.yaml")
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert "RAY_AUTH_MODE=token" in command, command
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the token file"
    for name, spec in _kuberay_cluster_specs().items():
        assert spec["authOptions"]["mode"] == "token", name


def test_dashboard_is_not_exposed_publicly():
    """The dashboard submits jobs, i.e. runs code: bound to localhost (launcher), ClusterIP only (KubeRay)."""
    for path in YAML_FILES:
        for text in _strings(path):
            assert "0.0.0.0" not in text, f"{path.name}: {text!r}"
            assert text not in ("LoadBalancer", "NodePort"), f"{path.name}: service type {text}"
    head_start = " ".join(_load("launcher.yaml")["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for name, spec in _kuberay_cluster_specs().items():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        assert spec["headGroupSpec"].get("enableIngress", False) is False, name


def test_every_python_m_module_exists():
    """A `python -m X` naming a module that was renamed or never written fails on every node at setup or submit."""
    modules = {m for path in TEXT_FILES for text in _strings(path) for m in PYTHON_M.findall(text)}
    assert {"jobs.infer", "pipelines.hub", "cluster.local"} <= modules, f"scan found only {sorted(modules)}"
    for module in sorted(modules):
        if module.split(".")[0] in REPO_PACKAGES:
            base = REPO / module.replace(".", "/")
            assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), f"no module {module} in repo"
        else:
            assert importlib.util.find_spec(module) is not None, f"module {module} is not installed"


def test_every_repository_path_mentioned_exists():
    """Paths like cluster/runtime_env.yaml or jobs/data/... in manifests and docs must not go stale."""
    mentioned = {m.rstrip("/.") for path in TEXT_FILES for m in REPO_PATH.findall(path.read_text())}
    assert "cluster/runtime_env.yaml" in mentioned, f"scan found only {sorted(mentioned)}"
    missing = sorted(p for p in mentioned if not (REPO / p).exists())
    assert not missing, f"mentioned but missing: {missing}"


def test_local_sources_of_the_launcher_and_dockerfile_exist():
    """`ray up` mounts these from the repository root and `docker build` copies these: a missing one aborts it."""
    sources = [s for s in _load("launcher.yaml")["file_mounts"].values() if not s.startswith("~")]
    assert sources == ["."]
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    sources += [s for line in copies for s in line.split()]
    for source in sources:
        assert (REPO / source).exists(), f"missing: {source}"


def test_runtime_env_is_valid_and_matches_the_rayjob():
    """The runtime env parses as a Ray RuntimeEnv; the RayJob runs with the same env vars as `ray job submit`."""
    from ray.runtime_env import RuntimeEnv

    runtime_env = _load("runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"] == "." and (REPO / "pyproject.toml").is_file()
    assert runtime_env["env_vars"] == {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rayjob_env = yaml.safe_load(_load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert rayjob_env["env_vars"] == runtime_env["env_vars"]


def test_runtime_env_upload_leaves_out_venv_git_and_outputs():
    """Ray zips the working dir minus `excludes` for every job: the venv or the outputs would make it huge.

    Walks the repository the way Ray's packer does (its own exclude matcher; .gitignore NOT applied, so the
    excludes alone must be enough).
    """
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files = []
    _dir_travel(
        REPO,
        [_get_excludes(REPO, _load("runtime_env.yaml")["excludes"])],
        lambda p: p.is_file() and files.append(p),
        include_gitignore=False,
    )
    relative = [p.relative_to(REPO).as_posix() for p in files]
    assert "jobs/infer.py" in relative and "pipelines/hub.py" in relative
    for prefix in (".venv/", ".git/", "out/", "tests/data/"):
        assert not [r for r in relative if r.startswith(prefix)], f"{prefix} would be uploaded"
    assert not [r for r in relative if "__pycache__" in r]
    size = sum(p.stat().st_size for p in files)
    assert size < 50 * 2**20, f"the working dir upload would be {size / 2**20:.0f} MiB"


def test_rayjob_entrypoint_parses_with_the_jobs_cli():
    """The RayJob's command line must be accepted by jobs.infer's own argument parser (guards CLI drift)."""
    from jobs.infer import parse_args

    argv = shlex.split(_load("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.infer"]
    args = parse_args(argv[3:])
    assert args.task == "sentence-embeddings" and args.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert args.input and args.output


def test_rayservice_serve_config_builds_the_deploy_application():
    """serveConfigV2 is a valid Serve config whose applications `deploy.app:build_app` accepts (autoscaling checked
    against the replica limit included), with the same env vars as the jobs; no Serve is started."""
    from ray.serve.schema import ServeDeploySchema

    from deploy.app import build_app
    from deploy.router import build_router

    config = yaml.safe_load(_load("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema(**config)
    app, root = config["applications"]
    assert app["import_path"] == "deploy.app:build_app"
    assert (root["import_path"], root["route_prefix"]) == ("deploy.router:build_router", "/")
    assert build_router(root.get("args")) is not None
    assert app["runtime_env"]["env_vars"] == _load("runtime_env.yaml")["env_vars"]
    assert build_app(app["args"]) is not None
    group = _load("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] == app["args"]["autoscaling"]["max_replicas"]
