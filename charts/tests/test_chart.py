"""Chart checks that need no cluster and no helm binary.

- The chart is rendered by Helm's own template engine: `helm-python-sdk` binds the Helm 4 Go
  SDK (libhelm_c) and renders offline like `helm template`, values.schema.json validation
  included. Rendered: the default values and every `ci/*-values.yaml` variant.
- Every rendered manifest is validated against the Kubernetes OpenAPI schemas bundled in
  `kubernetes-validate` (strict: unknown fields fail), at the chart's oldest supported version
  and the newest bundled one. The ServiceMonitor is a CRD without a bundled schema: its wiring
  to the metrics Service is checked field by field instead.
- values.yaml and the merged variants are validated against values.schema.json (`jsonschema`).
- The ConfigMap's TOML is compared with config/default.toml (same keys, same values and types
  except the chart-owned ones), and, when a built `inferaligner` binary is around (CI builds
  it in `make test-rust`), accepted by `inferaligner check-config`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "inferaligner"
DEFAULT_TOML = ROOT / "config" / "default.toml"
RELEASE, NAMESPACE = "demo", "ml"
FULLNAME = f"{RELEASE}-inferaligner"
# The chart's kubeVersion floor (Chart.yaml) and the newest schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

VARIANTS: dict[str, dict[str, Any] | None] = {"default": None} | {
    path.name.removesuffix("-values.yaml"): yaml.safe_load(path.read_text())
    for path in sorted((CHART / "ci").glob("*-values.yaml"))
}
GPU = "gpu-external-servicemonitor"
VLLM = "vllm"

# The keys of the sidecar's config the chart sets itself (not from values.config), and what
# they render to under the default values where they differ from config/default.toml.
CHART_DEFAULTS = {
    "model.export": "/models/smollm2-135m-instruct",
    "model.pack": "/models/packs/smollm2-135m-instruct-refusal-answers.safetensors",
    "telemetry.log_format": "json",
}
POLICY_KEYS = {
    "mode",
    "alpha",
    "generated_scale",
    "layers",
    "offset",
    "refusal",
    "on_error",
    "raw_completions",
    "gate_system_prompts",
    "steered_answers",
    "retry_scales",
    "selectable",
}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _render(chart: helm.Chart, values: dict[str, Any] | None) -> dict[str, str]:
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def _objects(rendered: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} rendered twice"
                objects[key] = doc
    return objects


@functools.cache
def _variant(name: str) -> tuple[dict[str, str], dict[tuple[str, str], dict[str, Any]]]:
    with helm.Chart.load(CHART) as loaded:
        rendered = _render(loaded, copy.deepcopy(VARIANTS[name]))
    return rendered, _objects(rendered)


def objects(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    return copy.deepcopy(_variant(name)[1])


def deployment(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return objs[("Deployment", FULLNAME)]


def container(objs: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    pod = deployment(objs)["spec"]["template"]["spec"]
    (found,) = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name]
    return found


def config_toml(objs: dict[tuple[str, str], dict[str, Any]]) -> str:
    return objs[("ConfigMap", FULLNAME)]["data"]["config.toml"]


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


# --- values and schema -------------------------------------------------------------------


def test_values_yaml_matches_the_schema():
    schema = values_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_variant_values_match_the_schema(chart, variant):
    merged = chart.merge_values(copy.deepcopy(VARIANTS[variant]))
    jsonschema.validate(merged, values_schema())


BAD_VALUES = {
    "unknown top-level key": {"replicas": 2},
    "unknown provider": {"gpu": {"provider": "rocm"}},
    "chart-owned config key": {"config": {"server": {"mode": "proxy"}}},
    "misspelled config key": {"config": {"server": {"drain_grace": 30}}},
    "bad policy mode": {"config": {"policies": {"default": {"mode": "stear"}}}},
    "bad on_error": {"config": {"policies": {"strict": {"on_error": "fail-safe"}}}},
    "bad policy name": {"config": {"policies": {"my policy": {"mode": "off"}}}},
    "https upstream": {"upstream": {"url": "https://vllm:8000"}},
    "float where integer": {"config": {"server": {"retry_after_s": 1.5}}},
    "relative mount path": {"model": {"mountPath": "models"}},
    "passthrough route not a path": {"config": {"upstream": {"passthrough": ["v1/embeddings"]}}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(chart, values):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chart.merge_values(copy.deepcopy(values)), values_schema())
    with pytest.raises(helm.HelmValuesError):
        _render(chart, values)


BAD_COMBINATIONS = {
    "grace period within the drain": ({"terminationGracePeriodSeconds": 25}, "larger than"),
    "model server and upstream": (
        {"modelServer": {"enabled": True}, "upstream": {"url": "http://vllm:8000"}},
        "not both",
    ),
    "pvc without claim": ({"model": {"source": "pvc"}}, "existingClaim"),
    "pdb with both bounds": (
        {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}},
        "exactly one",
    ),
}


@pytest.mark.parametrize(
    ("values", "message"), BAD_COMBINATIONS.values(), ids=BAD_COMBINATIONS.keys()
)
def test_templates_refuse_inconsistent_values(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        _render(chart, values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict_is_clean(variant):
    report = helm.lint(CHART, copy.deepcopy(VARIANTS[variant]), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- Kubernetes schemas ------------------------------------------------------------------

EXPECTED_OBJECTS = {
    "default": {
        ("ConfigMap", FULLNAME),
        ("Deployment", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("Service", FULLNAME),
        ("ServiceAccount", FULLNAME),
    },
}
EXPECTED_OBJECTS[GPU] = EXPECTED_OBJECTS["default"] | {
    ("PodDisruptionBudget", FULLNAME),
    ("Service", f"{FULLNAME}-metrics"),
    ("ServiceMonitor", FULLNAME),
}
EXPECTED_OBJECTS[VLLM] = EXPECTED_OBJECTS["default"] | {
    ("PodDisruptionBudget", FULLNAME),
    ("HorizontalPodAutoscaler", FULLNAME),
}


def test_every_variant_is_covered():
    assert set(VARIANTS) == set(EXPECTED_OBJECTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant):
    objs = objects(variant)
    assert set(objs) == EXPECTED_OBJECTS[variant]
    for (kind, name), obj in objs.items():
        assert obj["metadata"]["namespace"] == NAMESPACE
        if kind == "ServiceMonitor":  # a CRD: checked in test_servicemonitor_*
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{kind}/{name} against Kubernetes {version}: {path}: {e.message}")


MUTATIONS = {
    "unknown container field": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        {"readinessProbes": {}}
    ),
    "string replicas": lambda d: d["spec"].update({"replicas": "one"}),
    "preStop sleep without seconds": lambda d: d["spec"]["template"]["spec"]["containers"][0][
        "lifecycle"
    ]["preStop"].update({"sleep": {}}),
}


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_kubernetes_validation_catches_broken_manifests(mutate):
    broken = deployment(objects("default"))
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_recommended_labels_everywhere(variant):
    for key, obj in objects(variant).items():
        labels = obj["metadata"]["labels"]
        assert all(label in labels for label in RECOMMENDED_LABELS), key
        assert labels["app.kubernetes.io/instance"] == RELEASE, key
    pod = deployment(objects(variant))["spec"]["template"]["metadata"]["labels"]
    assert all(label in pod for label in RECOMMENDED_LABELS)


# --- services, ports, probes --------------------------------------------------------------


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_exposes_only_the_api_port(variant):
    objs = objects(variant)
    service = objs[("Service", FULLNAME)]
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", "http")]
    pod = deployment(objs)["spec"]["template"]
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    sidecar = container(objs, "inferaligner")
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    config = tomllib.loads(config_toml(objs))
    assert config["server"]["listen"] == f"0.0.0.0:{ports['http']}"
    assert config["server"]["admin_listen"] == f"0.0.0.0:{ports['admin']}"
    policy = objs[("NetworkPolicy", FULLNAME)]["spec"]
    assert matches(policy["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    admitted = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert admitted == ["http", "admin"]  # a model server's port is not admitted


def test_servicemonitor_scrapes_the_admin_port_through_the_metrics_service():
    objs = objects(GPU)
    monitor = objs[("ServiceMonitor", FULLNAME)]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    metrics = objs[("Service", f"{FULLNAME}-metrics")]
    api = objs[("Service", FULLNAME)]
    assert matches(selector, metrics["metadata"]["labels"])
    assert not matches(selector, api["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    (port,) = metrics["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("admin", "admin")
    assert metrics["spec"]["clusterIP"] == "None"
    pod = deployment(objs)["spec"]["template"]
    assert matches(metrics["spec"]["selector"], pod["metadata"]["labels"])
    assert "admin" in {p["name"] for p in container(objs, "inferaligner")["ports"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_on_the_admin_port(variant):
    sidecar = container(objects(variant), "inferaligner")
    probes = {
        kind: (sidecar[kind]["httpGet"]["path"], sidecar[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/ready", "admin"),
        "livenessProbe": ("/live", "admin"),
        "readinessProbe": ("/ready", "admin"),
    }
    startup = sidecar["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_outlasts_the_drain(variant):
    objs = objects(variant)
    pod = deployment(objs)["spec"]["template"]["spec"]
    drain = tomllib.loads(config_toml(objs))["server"]["drain_grace_s"]
    pre_stop = container(objs, "inferaligner")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    if VARIANTS[variant] and VARIANTS[variant].get("modelServer", {}).get("enabled"):
        server = container(objs, "model-server")
        assert server["lifecycle"]["preStop"]["sleep"]["seconds"] >= pre_stop + drain


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_context(variant):
    objs = objects(variant)
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    every = pod["containers"] + pod.get("initContainers", [])
    ours = [c for c in every if c["name"] != "model-server"]
    assert ours
    for c in ours:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]


# --- topology, model, GPU, telemetry ------------------------------------------------------


def test_default_is_local_mode_with_models_copied_from_an_image():
    objs = objects("default")
    config = tomllib.loads(config_toml(objs))
    assert config["server"]["mode"] == "local"
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["inferaligner"]
    copier = container(objs, "copy-models")
    assert copier["command"] == ["cp", "-R", "/models/.", "/mnt/models/"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["models"]
    mounts = {m["name"]: m for m in container(objs, "inferaligner")["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True
    assert config["model"]["export"].startswith(mounts["models"]["mountPath"] + "/")


def test_vllm_in_the_pod_behind_the_sidecar():
    objs = objects(VLLM)
    config = tomllib.loads(config_toml(objs))
    assert config["server"]["mode"] == "proxy"
    assert config["upstream"]["url"] == "http://127.0.0.1:8000"
    assert config["upstream"]["passthrough"] == ["/v1/embeddings", "/tokenize", "/detokenize"]
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["inferaligner", "model-server"]
    server = container(objs, "model-server")
    assert server["image"].startswith("vllm/vllm-openai:")
    assert [p["containerPort"] for p in server["ports"]] == [8000]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {m["name"] for m in server["volumeMounts"]} == {"models", "dshm"}
    assert "nvidia.com/gpu" not in container(objs, "inferaligner")["resources"].get("limits", {})
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {
        "claimName": "finance-models",
        "readOnly": True,
    }
    assert "replicas" not in deployment(objs)["spec"]  # left to the HPA
    hpa = objs[("HorizontalPodAutoscaler", FULLNAME)]["spec"]
    assert hpa["scaleTargetRef"]["name"] == FULLNAME
    assert [m["type"] for m in hpa["metrics"]] == ["Pods"]


def test_gpu_is_one_switch():
    cpu, gpu = objects("default"), objects(GPU)
    assert tomllib.loads(config_toml(cpu))["model"]["provider"] == "cpu"
    assert container(cpu, "inferaligner")["image"] == "inferaligner:0.1.0"
    assert "nvidia.com/gpu" not in container(cpu, "inferaligner")["resources"].get("limits", {})
    assert tomllib.loads(config_toml(gpu))["model"]["provider"] == "cuda"
    assert container(gpu, "inferaligner")["image"] == "inferaligner:0.1.0-cuda"
    assert container(gpu, "inferaligner")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_external_upstream_pvc_and_policies_from_values():
    objs = objects(GPU)
    config = tomllib.loads(config_toml(objs))
    assert config["server"]["mode"] == "proxy"
    assert config["upstream"]["url"] == "http://vllm.inference.svc.cluster.local:8000"
    assert config["model"]["export"] == "/models/llama-3.1-8b-finance"
    assert config["server"]["drain_grace_s"] == 45.5
    assert set(config["policies"]) == {"default", "strict", "audit"}  # monitor: null drops it
    assert config["policies"]["default"]["alpha"] == 4.5
    assert config["policies"]["default"]["layers"] == [10, 11, 12, 13, 14, 15]
    assert config["policies"]["audit"]["offset"] == -0.5
    mounts = {m["name"]: m for m in container(objs, "inferaligner")["volumeMounts"]}
    assert mounts["models"]["subPath"] == "finance"
    pod = deployment(objs)["spec"]["template"]
    assert "initContainers" not in pod["spec"]
    assert pod["metadata"]["annotations"]["inferaligner.io/model-revision"] == "2026-11-30.1"


def test_otel_environment():
    env = container(objects(GPU), "inferaligner")["env"]
    names = [e["name"] for e in env]
    values = {e["name"]: e.get("value") for e in env}
    assert values["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        "http://otel-collector.observability.svc.cluster.local:4318"
    )
    assert values["OTEL_SERVICE_NAME"] == FULLNAME
    attributes = dict(a.split("=", 1) for a in values["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    assert attributes["deployment.environment"] == "production"
    assert attributes["k8s.pod.name"] == "$(K8S_POD_NAME)"
    assert attributes["k8s.namespace.name"] == "$(K8S_NAMESPACE)"
    # $(VAR) only expands variables defined earlier in the list.
    assert names.index("K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    default_env = {e["name"] for e in container(objects("default"), "inferaligner")["env"]}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in default_env


# --- the config file ----------------------------------------------------------------------


def test_config_toml_matches_default_toml():
    rendered = flatten(tomllib.loads(config_toml(objects("default"))))
    default = flatten(tomllib.loads(DEFAULT_TOML.read_text()))
    assert set(rendered) == set(default)
    for key, value in default.items():
        expected = CHART_DEFAULTS.get(key, value)
        got = rendered[key]
        assert (got, type(got)) == (expected, type(expected)), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_toml_keys_are_the_sidecars(variant):
    config = tomllib.loads(config_toml(objects(variant)))
    policies = config.pop("policies")
    default = tomllib.loads(DEFAULT_TOML.read_text())
    default.pop("policies")
    assert set(flatten(config)) == set(flatten(default))
    assert config["default_policy"] in policies
    for name, policy in policies.items():
        assert set(policy) <= POLICY_KEYS, name


def test_checksum_rolls_the_pods_on_config_changes(chart):
    def checksum(values):
        objs = _objects(_render(chart, values))
        return deployment(objs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum(None)
    assert checksum({"config": {"policies": {"default": {"offset": 0.25}}}}) != base
    assert checksum({"config": {"server": {"max_new_tokens": 512}}}) != base
    assert checksum({"replicaCount": 3}) == base


def _binary() -> Path | None:
    if os.environ.get("INFERALIGNER_BIN"):
        return Path(os.environ["INFERALIGNER_BIN"])
    built = [ROOT / "target" / p / "inferaligner" for p in ("release", "debug")]
    built = [p for p in built if p.is_file()]
    return max(built, key=lambda p: p.stat().st_mtime) if built else None


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_accepted_by_the_binary(variant, tmp_path):
    binary = _binary()
    if binary is None:
        pytest.skip("no built inferaligner binary (cargo build -p inferaligner)")
    rendered = tmp_path / "config.toml"
    rendered.write_text(config_toml(objects(variant)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERALIGNER_")}
    run = subprocess.run(
        [binary, "check-config", "--config", rendered],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    merged = flatten(tomllib.loads(run.stdout))
    for key, value in flatten(tomllib.loads(rendered.read_text())).items():
        if isinstance(value, float):
            assert math.isclose(merged[key], value, rel_tol=1e-6), key  # f32 fields
        else:
            assert merged[key] == value, key


def test_notes_render():
    notes = next(text for path, text in _variant(VLLM)[0].items() if path.endswith("NOTES.txt"))
    assert "Mode: proxy" in notes and "model-server" in notes
    assert "kubectl -n ml port-forward service/demo-inferaligner 8080:8080" in notes
