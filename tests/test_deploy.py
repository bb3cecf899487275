"""deploy/ read against the real schemas and against the code, offline: the KubeRay manifests validate against
the KubeRay v1.7 CRDs (../shared/kuberay), the `ray up` configs against Ray's own cluster schema, and every
name, flag, port and version they mention is one the code, the image and pyproject.toml agree on. The image
itself cannot be built here (no Docker engine): its Dockerfile is checked by reading, and what it copies is
built into a wheel and installed (dry run) under its Ray constraint.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from support import lamina_gauges

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.flags import config_from_args
from pipeline.rundir import checkpoint_location
from pipeline.stage import partition
from pipeline.telemetry.collapse import COLLAPSE_SPREAD

if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
CRDS = (REPO / ".." / "shared" / "kuberay").resolve()  # the KubeRay v1.7 CRDs, shared with the project
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
README = (REPO / "README.md").read_text()
STORAGE_KEY = "LAMINA_STORAGE"  # the key of the Secret `lamina-storage` the manifests take the storage URI from


# -- what the code says --------------------------------------------------------------------------------------


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults: RAY_VERSION and PYTHON_TAG are the one place the versions are stated."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def versions() -> tuple[str, str, str]:
    """(Ray version, Python version as X.Y, torch version) of the deployment."""
    args = dockerfile_args()
    python = re.fullmatch(r"py(\d)(\d+)", args["PYTHON_TAG"])
    assert python, args["PYTHON_TAG"]
    return args["RAY_VERSION"], f"{python[1]}.{python[2]}", args["TORCH_VERSION"]


def image_tag() -> str:
    """The tag deploy/docker/Dockerfile's header builds, and every manifest must name."""
    args = dockerfile_args()
    return f"lamina:{PYPROJECT['project']['version']}-ray{args['RAY_VERSION']}-{args['PYTHON_TAG']}-gpu"


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) of every YAML document in deploy/kuberay/."""
    found = [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert found
    return found


def kind(name: str) -> dict:
    (doc,) = [d for _, d in manifests() if d["kind"] == name]
    return doc


def cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster the manifests describe: the RayCluster's spec and the RayJob's rayClusterSpec."""
    return [(f, d["spec"]) for f, d in manifests() if d["kind"] == "RayCluster"] + \
        [(f, d["spec"]["rayClusterSpec"]) for f, d in manifests() if d["kind"] == "RayJob"]


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def entrypoint_config(job: dict, storage_uri: str = "s3://lamina-test/prefix") -> TrainConfig:
    """The TrainConfig the RayJob's entrypoint would run with: its variables expanded from the ConfigMap (and
    a storage URI standing for the Secret's) as bash on the head would, then parsed by lamina's own CLI."""
    from pipeline.cli import parser

    settings = {**kind("ConfigMap")["data"], STORAGE_KEY: storage_uri}
    outer = shlex.split(job["spec"]["entrypoint"])
    assert outer[:2] == ["bash", "-c"] and len(outer) == 3, outer
    script = re.sub(r"\$(\w+)", lambda m: settings[m[1]], outer[2])
    words = shlex.split(script)
    assert words[:3] == ["exec", "lamina", "train"], words
    args = parser().parse_args(words[2:])  # an unknown flag or bad value exits here
    return config_from_args(args)


# -- the CRD schemas -----------------------------------------------------------------------------------------


def crd_schema(name: str) -> dict:
    """The v1 openAPIV3Schema of a KubeRay CRD, made strict the way the API server is: defaults filled before
    `required` is checked (done per manifest, by `with_defaults`), and unknown fields refused where the schema
    lists its fields (the API server would drop them silently: a misspelt field would do nothing)."""
    path = CRDS / f"ray.io_{name}.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _close(schema)
    return schema


def _close(schema: Any) -> None:
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _close(value)
    elif isinstance(schema, list):
        for value in schema:
            _close(value)


def with_defaults(instance: Any, schema: dict) -> Any:
    """`instance` with the schema's defaults filled in, as the API server does before validating."""
    if isinstance(instance, dict) and schema.get("type") == "object":
        out = dict(instance)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = with_defaults(out[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(out) - set(schema.get("properties", {})):
                out[key] = with_defaults(out[key], extra)
        return out
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(item, schema["items"]) for item in instance]
    return instance


def crd_errors(doc: dict) -> list[str]:
    schema = crd_schema({"RayCluster": "rayclusters", "RayJob": "rayjobs"}[doc["kind"]])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(with_defaults(doc, schema))]


def test_the_validator_fills_defaults_and_refuses_what_the_api_server_would_drop() -> None:
    ok = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
          "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": []}}},
                   "workerGroupSpecs": [{"groupName": "w", "template": {"spec": {"containers": []}}}]}}
    assert crd_errors(ok) == []  # minReplicas and maxReplicas are required, and defaulted
    typo = copy.deepcopy(ok)
    typo["spec"]["workerGroupSpecs"][0]["replica"] = 4
    assert any("'replica' was unexpected" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(ok)
    wrong["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # values are strings
    assert any("rayStartParams.num-cpus" in e for e in crd_errors(wrong))


@pytest.mark.parametrize("name", [p.name for p in sorted(KUBERAY.glob("*.yaml"))])
def test_every_kuberay_manifest_validates(name: str) -> None:
    for doc in yaml.safe_load_all((KUBERAY / name).read_text()):
        assert doc["metadata"]["name"]
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1"
            assert crd_errors(doc) == []
        elif doc["kind"] == "ConfigMap":
            assert doc["apiVersion"] == "v1"
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in doc["data"].items()), doc["data"]
        elif doc["kind"] == "PodMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}  # KubeRay's label
        else:
            raise AssertionError(f"{name}: unexpected kind {doc['kind']}")


# -- the manifests against the code ----------------------------------------------------------------------------


def test_the_entrypoint_runs_lamina_train_with_the_configmap_and_a_shared_store() -> None:
    job, settings = kind("RayJob"), kind("ConfigMap")["data"]
    used = set(re.findall(r"\$(\w+)", job["spec"]["entrypoint"]))
    assert used == set(settings) | {STORAGE_KEY}, used ^ (set(settings) | {STORAGE_KEY})  # none missing, none dead
    cfg = entrypoint_config(job)
    assert cfg.engine == "ray"
    # The driver runs on the head (num-cpus 0), the stages on the workers: several nodes, so the store must
    # be one every node reaches (pipeline/engines/placement.py would refuse it otherwise).
    assert storage.is_shared(checkpoint_location(cfg)) and storage.is_shared(cfg.run_dir)
    assert storage.is_shared(checkpoint_location(entrypoint_config(job, "file:///mnt/shared/lamina")))
    stages = len(partition(cfg.n_layers, cfg.layers_per_stage))
    for file, spec in cluster_specs():
        head, (workers,) = spec["headGroupSpec"], spec["workerGroupSpecs"]
        assert head["rayStartParams"]["num-cpus"] == "0", file
        assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == stages, file
        head_env, worker_env = ray_container(head)["envFrom"], ray_container(workers)["envFrom"]
        assert {"configMapRef": {"name": kind("ConfigMap")["metadata"]["name"]}} in head_env, file  # the driver
        assert {"secretRef": {"name": "lamina-storage"}} in head_env, file
        assert {"secretRef": {"name": "lamina-storage"}} in worker_env, file  # each stage writes its parts


def test_one_gpu_per_worker_and_every_pod_sized() -> None:
    for file, spec in cluster_specs():
        for group in groups(spec):
            resources = ray_container(group)["resources"]
            assert resources["requests"] == resources["limits"], file  # guaranteed: never evicted first
            assert {"cpu", "memory"} <= set(resources["limits"]), file
        for workers in spec["workerGroupSpecs"]:
            assert ray_container(workers)["resources"]["limits"]["nvidia.com/gpu"] == 1, file
        assert "nvidia.com/gpu" not in ray_container(spec["headGroupSpec"])["resources"]["limits"], file


def test_the_standalone_cluster_is_the_jobs_cluster() -> None:
    assert kind("RayCluster")["spec"] == kind("RayJob")["spec"]["rayClusterSpec"]


def test_ports_are_named_and_agree() -> None:
    from ray._private import ray_constants

    for file, spec in cluster_specs():
        for group in groups(spec):
            ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
            metrics = int(group["rayStartParams"]["metrics-export-port"])
            assert ports["metrics"] == metrics, file
            annotations = group["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == metrics
        head = {p["name"]: p["containerPort"] for p in ray_container(spec["headGroupSpec"])["ports"]}
        assert head["dashboard"] == ray_constants.DEFAULT_DASHBOARD_PORT == 8265, file
        assert head["gcs-server"] == ray_constants.DEFAULT_PORT, file
        assert head["client"] == 10001, file  # `ray start --head`'s Ray Client port (KubeRay's DefaultClientPort)
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", file  # the dashboard by port-forward only
    (endpoint,) = kind("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The README's port-forwards reach the services KubeRay makes for these names.
    for name in (kind("RayCluster")["metadata"]["name"], kind("RayJob")["metadata"]["name"]):
        assert f"kubectl port-forward svc/{name}-head-svc 8265:8265" in README, name


def test_versions_agree_with_pyproject_and_the_image() -> None:
    ray_version, python, torch = versions()
    deps = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0]: d for d in PYPROJECT["project"]["dependencies"]}
    assert ray_version in SpecifierSet(deps["ray"].split("]", 1)[1]), (ray_version, deps["ray"])
    assert torch in SpecifierSet(deps["torch"][len("torch"):]), (torch, deps["torch"])
    assert python + ".0" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert f"torch=={torch}" in (REPO / ".ci" / "run").read_text()  # the torch the tests run with
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu" in dockerfile
    assert f"docker build -f deploy/docker/Dockerfile -t {image_tag()} ." in dockerfile
    assert f"docker build -f deploy/docker/Dockerfile -t {image_tag()} ." in README
    for file, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, file
        for group in groups(spec):
            assert ray_container(group)["image"] == image_tag(), file


def test_the_image_installs_lamina_and_runs_as_a_user() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # What it copies is what setuptools packages, and it exists; the ignore file lets it through.
    copies = re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.MULTILINE)
    copied = [src for line in copies for src in line.split()[:-1]]
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= set(copied)
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied) and all((REPO / src).exists() for src in copied), copied
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{src}" in ignore or f"!{src}/" in ignore for src in copied), ignore
    # The console script the manifests run is the project's, and the build proves it is installed.
    script = PYPROJECT["project"]["scripts"]["lamina"]
    module, _, function = script.partition(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function)), script
    assert "lamina --help" in dockerfile
    assert 'echo "ray==${RAY_VERSION}" > /tmp/ray-constraint.txt' in dockerfile  # Ray stays pinned (pip refuses
    assert "--constraint /tmp/ray-constraint.txt" in dockerfile                  # extras in a constraint)


def test_what_the_image_copies_builds_a_wheel_with_the_console_script(tmp_path: Path) -> None:
    """The Dockerfile's build, short of Docker: its COPY sources alone build lamina's wheel, which carries the
    `lamina` console script, and installing it under the image's constraint leaves Ray as it is."""
    import ray

    pytest.importorskip("setuptools")  # the build backend, used without an isolated build environment
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    context = tmp_path / "context"
    context.mkdir()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.MULTILINE):
        for src in line.split()[:-1]:
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, context / src, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / src, context / src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path),
                            str(context)], capture_output=True, text=True, check=False, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("lamina-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "lamina = pipeline.cli:main" in z.read(entry_points).decode()
    assert "pipeline/cli.py" in names and "workers/learner.py" in names

    ray_version = versions()[0]
    if ray.__version__ != ray_version:
        pytest.skip(f"the constraint check needs Ray {ray_version} installed here (found {ray.__version__})")
    constraint = tmp_path / "ray-constraint.txt"
    constraint.write_text(f"ray=={ray_version}\n")
    dry = subprocess.run([*pip, "install", "--dry-run", "--no-index", "--constraint", str(constraint), str(wheel)],
                         capture_output=True, text=True, check=False, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    installs = re.findall(r"^Would install (.*)$", dry.stdout, re.MULTILINE)
    assert installs == [f"lamina-{PYPROJECT['project']['version']}"], dry.stdout[-2000:]


# -- the Grafana dashboard -----------------------------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str, str]]:
    board = json.loads((DEPLOY / "grafana" / "lamina.json").read_text())
    return [(panel["title"], t["expr"], t.get("legendFormat", "")) for panel in board["panels"]
            for t in panel.get("targets", [])]


def test_the_dashboard_has_a_panel_for_every_lamina_metric_with_its_real_tags() -> None:
    known = lamina_gauges()
    assert {"ray_lamina_loss", "ray_lamina_queue_depth", "ray_lamina_busy_fraction"} <= set(known)
    shown: set[str] = set()
    for title, expr, legend in dashboard_targets():
        names = set(re.findall(r"\bray_lamina_\w+", expr))
        assert names and names <= set(known), (title, names - set(known))  # only metrics the code sets
        tags = set(known[next(iter(names))])
        by = re.search(r"by \(([^)]*)\)", expr)
        assert by and {t.strip() for t in by[1].split(",")} <= tags, (title, by and by[1], tags)
        assert set(re.findall(r"{{(\w+)}}", legend)) <= tags, (title, legend)
        assert set(re.findall(r"(\w+)=~", expr)) <= tags, (title, expr)
        shown |= names
    assert shown == set(known), set(known) - shown  # a panel for every metric


def test_the_dashboard_marks_the_collapse_alarm_where_the_code_does() -> None:
    board = json.loads((DEPLOY / "grafana" / "lamina.json").read_text())
    (spread,) = [p for p in board["panels"] if "ray_lamina_spread" in json.dumps(p.get("targets"))]
    steps = spread["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, COLLAPSE_SPREAD]
    (run,) = [v for v in board["templating"]["list"] if v["name"] == "run"]
    assert re.findall(r"label_values\((\w+), run\)", run["definition"])[0] in lamina_gauges()


# -- `ray up` ----------------------------------------------------------------------------------------------


CLUSTER_FILES = ["cluster.yaml", "cluster-local.yaml"]


def ray_up_config(name: str) -> dict:
    """The config as `ray up` would use it: defaults merged and validated against Ray's schema (offline)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((DEPLOY / name).read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_up_configs_validate_and_agree(name: str) -> None:
    from ray.scripts.scripts import start

    config = ray_up_config(name)
    ray_version, python, torch = versions()
    stages = len(partition(entrypoint_config(kind("RayJob")).n_layers,
                           entrypoint_config(kind("RayJob")).layers_per_stage))
    if config["provider"]["type"] == "local":  # one node type for all; every machine listed is started
        assert len(config["provider"]["worker_ips"]) == config["max_workers"] == stages
    else:
        (gpu,) = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
        assert gpu["min_workers"] == gpu["max_workers"] == config["max_workers"] == stages  # all from the start
        assert config["docker"]["image"] == f"rayproject/ray:{ray_version}-py{python.replace('.', '')}-gpu"
    setup = " ".join(config["setup_commands"])
    assert f'echo "ray=={ray_version}" > /tmp/ray-constraint.txt' in setup and f"torch=={torch}" in setup
    assert "--constraint /tmp/ray-constraint.txt" in setup and "-e " in setup
    # Every `ray start` flag exists; the same metrics port as the manifests; no stage on the head; token auth.
    options = {opt for p in start.params for opt in p.opts}
    metrics = int(kind("RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (command,) = [c for c in commands if "ray start" in c]
        flags = re.findall(r"(--[\w-]+)", command)
        assert set(flags) <= options, set(flags) - options
        assert f"--metrics-export-port={metrics}" in command and "RAY_AUTH_MODE=token" in command
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    assert any("auth_token" in remote for remote in config["file_mounts"])


# -- the README ----------------------------------------------------------------------------------------------


def readme_section() -> str:
    """The README's "Run on a cluster", up to the next heading of its level or above."""
    heading = "### Run on a cluster\n"
    start = README.index(heading) + len(heading)
    end = re.search(r"^#{2,3} ", README[start:], re.MULTILINE)
    return README[start:start + end.start()] if end else README[start:]


def test_the_readme_commands_use_real_flags_and_names() -> None:
    from pipeline.cli import parser

    section = readme_section()
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [m[1] for line in lines if (m := re.search(r"(?:^|--\s+|&&\s+)(?:lamina|python -m pipeline\.cli) (.*)", line))]
    assert len(commands) >= 6, commands
    for command in commands:
        words = shlex.split(command.split(" #", 1)[0])
        parser().parse_args(words)  # exits on an unknown command or flag
    assert "ray job submit" in section and "--working-dir ." in section and "RAY_AUTH_MODE=token" in section
    assert f"--from-literal={STORAGE_KEY}=" in section and "lamina-storage" in section
    for file in ("deploy/kuberay/rayjob-train-gpu.yaml", "deploy/kuberay/raycluster-gpu.yaml",
                 "deploy/kuberay/podmonitor.yaml", "deploy/kuberay/lamina-train.configmap.yaml",
                 "deploy/cluster.yaml", "deploy/cluster-local.yaml", "deploy/grafana/lamina.json"):
        assert file in section and (REPO / file).is_file(), file
