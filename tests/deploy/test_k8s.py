"""The Kubernetes manifests (docker/k8s, kustomize): they render, validate against the Kubernetes schemas, pass
checkov, and agree with the server (routes, port, options, metric names, shutdown timing, cache paths), so that
neither can drift from the other.

Needs `kubectl` (with its built-in kustomize), and the `kubernetes-validate` and `checkov` packages (test extra);
without them the affected tests skip and say why (they fail in CI, where they are part of the machine).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nitro_torch import config as nitro_config
from nitro_torch.config import OPTIONS, ServerConfig, build_config, load_yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
HPA_COMPONENT = "components/hpa-prometheus-adapter"
OVERLAYS = ("cpu-small", "gpu-8b-4bit", "gpu-70b-tp4")
GPU_OVERLAYS = ("gpu-8b-4bit", "gpu-70b-tp4")
# name -> (kustomization folder relative to docker/k8s, add the HPA component to it)
VARIANTS: dict[str, tuple[str, bool]] = {
    "base": ("base", False),
    **{name: (f"overlays/{name}", False) for name in OVERLAYS},
    **{f"{name}+hpa": (f"overlays/{name}", True) for name in OVERLAYS},
}
KUBERNETES_VERSION = "1.30.0"  # the oldest release with lifecycle.preStop.sleep on by default (beta)
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}  # not in kubernetes-validate's schemas: checked structurally below
WAITING_METRIC = "nitro:num_requests_waiting"
ADAPTER_VALUES = K8S / HPA_COMPONENT / "prometheus-adapter-values.yaml"
# NITRO_* variables the server reads that are not options (nitro_torch.config.OPTIONS), with the file that
# reads each one (checked, so a rename there fails here).
NON_OPTION_ENV = {"NITRO_HOME": ROOT / "nitro_torch" / "models" / "embedded.py"}
PRESTOP_MARGIN_S = 10  # termination grace beyond preStop + shutdown timeout: the engine's own shutdown and exit

# checkov findings accepted on purpose, each with why (checkov without a platform key reports no severities, so
# every other failed check fails the test):
CHECKOV_SKIPS = {
    # The image is a placeholder (kustomize `images:` in base/kustomization.yaml, nitro-torch:latest); each
    # deployment sets its own registry, tag or digest with `kustomize edit set image`.
    "CKV_K8S_14": "image tag `latest` is the placeholder, set per deployment",
    "CKV_K8S_43": "image digest is set per deployment (kustomize edit set image nitro-torch=...@sha256:...)",
}


def missing(reason: str) -> None:
    """In CI (where the tools are part of the machine) a missing tool is a failure, elsewhere a skip."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        missing("kubectl is not installed: rendering docker/k8s needs `kubectl kustomize`")
    return path


@functools.cache
def rendered_text(variant: str) -> str:
    folder, with_hpa = VARIANTS[variant]
    if not with_hpa:
        target = K8S / folder
    else:
        # As documented: add the component to the overlay's own kustomization (so that the overlay's replica
        # patches see the HPA). Done on a copy of docker/k8s, never in the repository.
        import tempfile

        copy = Path(tempfile.mkdtemp(prefix="nitro-k8s-")) / "k8s"
        shutil.copytree(K8S, copy)
        target = copy / folder
        kustomization = target / "kustomization.yaml"
        kustomization.write_text(kustomization.read_text() + f"components:\n  - ../../{HPA_COMPONENT}\n")
    result = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return result.stdout


def rendered(variant: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(variant)) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's literal env values (secretKeyRef entries left out)."""
    return {e["name"]: str(e["value"]) for e in container(docs).get("env", []) if "value" in e}


ALL_VARIANTS = pytest.mark.parametrize("variant", list(VARIANTS))


# (a) rendering ----------------------------------------------------------------------------------------------

@ALL_VARIANTS
def test_renders_with_the_expected_resources(variant: str) -> None:
    docs = rendered(variant)
    kinds = sorted(doc["kind"] for doc in docs)
    autoscaler = "HorizontalPodAutoscaler" if variant.endswith("+hpa") else "ScaledObject"
    expected = {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy",
                "PodDisruptionBudget", "ServiceMonitor", autoscaler}
    if variant.startswith(GPU_OVERLAYS):
        expected.add("ConfigMap")
    assert set(kinds) == expected and len(kinds) == len(expected), kinds
    assert {"HorizontalPodAutoscaler", "ScaledObject"} & set(kinds) == {autoscaler}, "exactly one autoscaler"
    namespaced = [doc for doc in docs if doc["kind"] != "Namespace"]
    assert {doc["metadata"].get("namespace") for doc in namespaced} == {one(docs, "Namespace")["metadata"]["name"]}


# (b) schemas ------------------------------------------------------------------------------------------------

@ALL_VARIANTS
def test_validates_against_the_kubernetes_schemas(variant: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed (pip install -e '.[test]')")
    docs = rendered(variant)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # custom resources: test_custom_resources_are_well_formed
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']}: {error.message} at "
                        f"{'.'.join(map(str, error.path))}")
    assert any(doc["kind"] in CRD_KINDS for doc in docs)


@ALL_VARIANTS
def test_custom_resources_are_well_formed(variant: str) -> None:
    docs = rendered(variant)
    service, deployment = one(docs, "Service"), one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"] and all(e["port"] in port_names for e in monitor["spec"]["endpoints"])
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                                    "targetLabels", "sampleLimit"}
    # every selector selects the pods
    for selector in (deployment["spec"]["selector"]["matchLabels"], one(docs, "Service")["spec"]["selector"],
                     one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert selector and selector.items() <= pod_labels.items()
    if variant.endswith("+hpa"):
        return
    scaled = one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "idleReplicaCount", "fallback", "advanced", "triggers"}
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
    assert all(isinstance(value, str) for value in trigger["metadata"].values()), "KEDA metadata values are strings"
    assert float(trigger["metadata"]["threshold"]) > 0


# (c) checkov ------------------------------------------------------------------------------------------------

def test_checkov_finds_nothing_but_the_listed_skips(tmp_path: Path) -> None:
    checkov = shutil.which("checkov") or shutil.which("checkov", path=str(Path(sys.executable).parent))
    if checkov is None:
        missing("checkov is not installed (pip install -e '.[test]')")
    for variant in VARIANTS:
        (tmp_path / f"{variant}.yaml").write_text(rendered_text(variant))
    result = subprocess.run(
        [checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json", "--compact",
         "--quiet", "--skip-download", "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=180, check=False, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON report (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['check_name']}: {c['file_path']} {c['resource']}"
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, "checkov findings:\n" + "\n".join(failed)
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0 and summary["passed"] > 0
    skipped = {c["check_id"] for r in reports for c in r["results"].get("skipped_checks", [])}
    assert skipped <= set(CHECKOV_SKIPS)


# (d) consistency with the server ----------------------------------------------------------------------------

@functools.cache
def app_routes() -> set[str]:
    from nitro_torch.config import Config
    from nitro_torch.server.app import create_app
    from nitro_torch.server.model_host import NO_MODEL

    config = Config()
    config.model.model = NO_MODEL  # builds the app without loading anything
    app = create_app(config)
    while not hasattr(app, "routes"):  # wrap_outermost: the Starlette app is inside the request-id layer
        app = app.app
    return {route.path for route in app.routes}


@ALL_VARIANTS
def test_probes_use_the_servers_routes_and_port(variant: str) -> None:
    docs = rendered(variant)
    main = container(docs)
    [port] = main["ports"]
    assert port["containerPort"] == ServerConfig().port == int(env_values(docs).get("NITRO_PORT", port["containerPort"]))
    assert port["name"] == "http"
    service_port = one(docs, "Service")["spec"]["ports"][0]
    assert service_port["targetPort"] in ("http", ServerConfig().port) and service_port["port"] == ServerConfig().port
    routes = app_routes()
    probes = {name: main[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    for name, probe in probes.items():
        assert probe["httpGet"]["path"] in routes, f"{name}: {probe['httpGet']['path']} is not a route"
        assert probe["httpGet"]["port"] in ("http", ServerConfig().port)
    assert probes["livenessProbe"]["timeoutSeconds"] >= 3  # /health may take ~1 s under a burst on small CPUs
    startup = probes["startupProbe"]
    window = startup["failureThreshold"] * startup["periodSeconds"]
    assert window >= (600 if variant.startswith(("base", "gpu")) else 300), "startup window too short for a load"


@ALL_VARIANTS
def test_grace_period_covers_prestop_and_the_drain(variant: str) -> None:
    docs = rendered(variant)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    env = env_values(docs)
    assert "NITRO_SHUTDOWN_TIMEOUT" in env, "the server's drain time must be explicit"
    shutdown = float(env["NITRO_SHUTDOWN_TIMEOUT"])
    pre_stop = container(docs)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:  # exec: ["sleep", "N"] (or sh -c "sleep N")
        sleep = int(re.search(r"sleep\W+(\d+)", " ".join(pre_stop["exec"]["command"])).group(1))
    assert 1 <= sleep
    assert pod["terminationGracePeriodSeconds"] >= sleep + shutdown + PRESTOP_MARGIN_S


@ALL_VARIANTS
def test_env_vars_and_the_config_file_are_real_options(variant: str) -> None:
    docs = rendered(variant)
    names = [e["name"] for e in container(docs).get("env", [])]
    assert len(names) == len(set(names)), "duplicate env var"
    option_envs = {opt.env for opt in OPTIONS.values()} | {getattr(nitro_config, "CONFIG_ENV", "--config")}
    for name in names:
        if name.startswith("NITRO_"):
            assert name in option_envs or name in NON_OPTION_ENV, f"{name} is not a nitro_torch option"
    for name, reader in NON_OPTION_ENV.items():
        assert f'"{name}"' in reader.read_text(), f"{reader} no longer reads {name}"
    key_file = env_values(docs)[OPTIONS["api_key_file"].env]  # the API key is a file of a mounted Secret
    mount = next(m for m in container(docs)["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] and mount.get("readOnly")
    # The effective configuration: the mounted config file (if any) < the env vars, as the server builds it.
    args, env = container(docs).get("args", []), env_values(docs)
    path = args[args.index("--config") + 1] if "--config" in args else env.get("NITRO_CONFIG")
    config_file = config_file_of(docs, path) if path else None
    env.pop("NITRO_CONFIG", None)
    env.pop(OPTIONS["api_key_file"].env)  # the Secret's file exists only in the pod
    config = build_config(env=env, config_file=config_file)
    assert config.server.host == "0.0.0.0"
    assert config.security.metrics_public  # the ServiceMonitor scrapes without a key
    gpus = container(docs)["resources"].get("limits", {}).get("nvidia.com/gpu")
    if variant.startswith("cpu-small"):
        assert config.model.device == "cpu" and gpus is None and config.model.model == "default"
    else:
        assert gpus == config.model.tensor_parallel_size and config.model.device in ("auto", "cuda")
    if variant.startswith("gpu-8b-4bit"):
        assert config.model.quantization == "bnb-4bit" and config.model.device == "cuda"


def config_file_of(docs: list[dict[str, Any]], path: str) -> Path:
    """The file a `--config` path points at, from the ConfigMap mounted there (written to a temp file)."""
    import tempfile

    main, pod = container(docs), one(docs, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in main["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == volume["configMap"]["name"])
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    target = Path(tempfile.mkdtemp(prefix="nitro-k8s-config-")) / key
    target.write_text(config_map["data"][key])
    return target


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_the_gpu_overlay_pulls_the_served_model_into_the_servers_cache_before_it_starts(overlay: str) -> None:
    """The init container runs `nitro-torch pull` on the config file the server reads, into the HF cache the server
    reads, on the model volume, with the network the server does without, and a token from an optional Secret
    (as a file, as the API key)."""
    from nitro_torch.cli import build_parser
    from nitro_torch.models.hub_names import hub_name_of

    docs = rendered(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [pull] = pod["initContainers"]
    main = container(docs)
    assert pull["image"] == main["image"] and pull["imagePullPolicy"] == "Always"
    assert pull["command"] == ["nitro-torch"] and build_parser().parse_args(pull["args"]).command == "pull"
    assert pull["securityContext"] == main["securityContext"]
    env, main_env = {e["name"]: e["value"] for e in pull["env"]}, env_values(docs)
    assert env["NITRO_CONFIG"] == main_env["NITRO_CONFIG"] and env["HF_HOME"] == main_env["HF_HOME"]
    assert "HF_HUB_OFFLINE" not in env and main_env["HF_HUB_OFFLINE"] == "1"
    assert not any(name.startswith("NITRO_") and name != "NITRO_CONFIG" for name in env)

    def volume_at(spec: dict[str, Any], path: str) -> tuple[str, str]:
        mount = max((m for m in spec["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])),
                    key=lambda m: len(m["mountPath"]))
        return mount["name"], mount["mountPath"]

    for path in (env["NITRO_CONFIG"], env["HF_HOME"]):
        assert volume_at(pull, path) == volume_at(main, path), f"{path} is not the server's"
    claim = next(v for v in pod["volumes"] if v["name"] == volume_at(pull, env["HF_HOME"])[0])
    assert claim["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    token = next(v for v in pod["volumes"] if v["name"] == volume_at(pull, env["HF_TOKEN_PATH"])[0])
    assert token["secret"]["optional"] is True and "valueFrom" not in str(pull["env"])
    config = build_config(env={}, config_file=config_file_of(docs, env["NITRO_CONFIG"]))
    assert hub_name_of(config.model.model) is not None, "the init container pulls the model the server serves"


@pytest.mark.parametrize(("overlay", "key", "value"), [("gpu-8b-4bit", "quantization", "bnb-4bit"),
                                                        ("gpu-70b-tp4", "tensor_parallel_size", 4)])
def test_the_gpu_overlay_config_matches_configs(overlay: str, key: str, value: object) -> None:
    """Each GPU overlay keeps a copy of its configs/ file (kustomize loads nothing outside its folder)."""
    copy = K8S / "overlays" / overlay / f"{overlay}.yaml"
    values = load_yaml(copy)  # only real options
    assert values[key] == value
    original = ROOT / "configs" / f"{overlay}.yaml"
    if original.is_file():
        assert load_yaml(original) == values, f"{copy} differs from {original}: copy it over"


def test_the_tensor_parallel_overlay_gives_each_rank_a_gpu() -> None:
    """--tensor-parallel-size N needs N GPUs in the pod, and NCCL a /dev/shm in memory."""
    docs = rendered("gpu-70b-tp4")
    config = build_config(env={}, config_file=config_file_of(docs, env_values(docs)["NITRO_CONFIG"]))
    resources = container(docs)["resources"]
    size = config.model.tensor_parallel_size
    assert size == 4 and resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == size
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    shm = next(m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in pod["volumes"] if v["name"] == shm["name"])["emptyDir"]["medium"] == "Memory"


@ALL_VARIANTS
def test_the_model_cache_is_on_the_volume(variant: str) -> None:
    docs = rendered(variant)
    main, pod = container(docs), one(docs, "Deployment")["spec"]["template"]["spec"]
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    volume = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
    mount = next(m for m in main["volumeMounts"] if m["name"] == volume)
    assert not mount.get("readOnly")  # the embedded model is converted into NITRO_HOME on first start
    env = env_values(docs)
    for name in ("HF_HOME", "NITRO_HOME"):
        assert Path(env[name]).is_relative_to(mount["mountPath"]), f"{name}={env[name]} is not on the volume"
    # read-only root: every path written at run time is a volume
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert {"/tmp", "/dev/shm"} <= mounts
    for name in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        if name in env:
            assert any(Path(env[name]).is_relative_to(m) for m in mounts), f"{name} is not writable"
    shm = next(v for v in pod["volumes"] if v["name"] == next(m["name"] for m in main["volumeMounts"]
                                                             if m["mountPath"] == "/dev/shm"))
    assert shm["emptyDir"]["medium"] == "Memory"


@ALL_VARIANTS
def test_pod_security(variant: str) -> None:
    docs = rendered(variant)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    security = container(docs)["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    resources = container(docs)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


def exported_metric_names() -> set[str]:
    """The families /metrics exports, scraped from an app with a stub engine."""
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    from nitro_torch.config import Config
    from nitro_torch.engine.client import EngineStats
    from nitro_torch.server.app import create_app

    class StubEngine:
        model_name = "stub"
        is_alive = True
        max_model_len = 16
        num_live_requests = 3
        info = type("Info", (), {"max_num_seqs": 8})()

        def stats(self) -> EngineStats:
            return EngineStats(num_running=8, num_waiting=3)  # every slot taken: all 3 wait

    config = Config()
    try:
        app = create_app(config, engine=StubEngine())  # type: ignore[arg-type]
        with TestClient(app) as client:
            response = client.get("/metrics")
    except Exception as error:  # a stub the host does not accept: fall back to the registry's collector
        pytest.fail(f"could not scrape an app's /metrics with a stub engine: {error!r}")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert any(s.labels.get("model_name") == "stub" and s.value == 3
               for s in families[WAITING_METRIC].samples)
    return set(families)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "base"])
def test_autoscaling_uses_the_exported_metric(variant: str) -> None:
    assert WAITING_METRIC in exported_metric_names()
    docs = rendered(variant)
    service, namespace = one(docs, "Service")["metadata"]["name"], one(docs, "Namespace")["metadata"]["name"]
    if not variant.endswith("+hpa"):
        query = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
        assert re.search(rf"\b{re.escape(WAITING_METRIC)}\{{", query), query
        # the series' labels as the ServiceMonitor sets them: job = the Service's name, and the namespace
        assert f'job="{service}"' in query and f'namespace="{namespace}"' in query, query
        return
    hpa = one(docs, "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    name = metric[metric["type"].lower()]["metric"]["name"]
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    [rule] = [r for r in rules if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(WAITING_METRIC + "{")
    assert re.fullmatch(rule["name"]["matches"], WAITING_METRIC)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_overlay_replica_bounds_reach_either_autoscaler() -> None:
    scaled = one(rendered("cpu-small"), "ScaledObject")["spec"]
    hpa = one(rendered("cpu-small+hpa"), "HorizontalPodAutoscaler")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    base = one(rendered("base"), "ScaledObject")["spec"]
    assert scaled["maxReplicaCount"] < base["maxReplicaCount"]
    assert "replicas" not in one(rendered("base"), "Deployment")["spec"], "the autoscaler owns the replica count"
