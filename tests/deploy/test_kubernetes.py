"""The Kubernetes manifests, checked offline (no cluster is contacted).

- Schemas: kubernetes-validate checks every built-in object in strict mode (an unknown
  field fails) against the oldest Kubernetes the manifests are for and the newest it
  knows. It has no schema for the ServiceMonitor (a CRD of the Prometheus Operator):
  a test pins that down, and the ServiceMonitor's fields are checked here by hand.
- Consistency: selectors select the pods, probes and Services use the container's
  ports, which are the server's; the HPA scales the Deployment on a metric the server
  exports, through an adapter rule whose query promtool evaluates; the grace periods
  cover the preStop sleep and the server's drain; security settings match the image's
  user; the GPU and CPU Deployments differ only where they must; every SALIENCE_*
  variable is a setting.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from salience_server.metrics import Metrics
from salience_server.settings import Settings, SettingsError
from tests.deploy.deploy_files import (
    KUBERNETES,
    REPO,
    dockerfile,
    stage_count,
    unknown_variables,
    variables_in_text,
    yaml_documents,
)

# The oldest version the manifests are for (the preStop `sleep` action is on by default
# from 1.30), and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
DEPLOYMENTS = {"gpu": KUBERNETES / "deployment-gpu.yaml", "cpu": KUBERNETES / "deployment-cpu.yaml"}
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
# Seconds the server needs after its drain to release the models and exit.
EXIT_MARGIN_SECONDS = 5


def load(path: Path) -> dict[str, Any]:
    (document,) = yaml_documents(path)
    return document


def objects() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml_documents(path)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment(variant: str) -> dict[str, Any]:
    return load(DEPLOYMENTS[variant])


def container(variant: str) -> dict[str, Any]:
    (only,) = deployment(variant)["spec"]["template"]["spec"]["containers"]
    return only


def env(variant: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(variant).get("env", [])}


def settings(variant: str) -> Settings:
    """The settings the container's server starts with (its variables over defaults)."""
    return Settings.load(environ=env(variant))


def port_numbers(variant: str) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(variant)["ports"]}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schema(path: Path, version: str) -> None:
    for document in yaml_documents(path):
        if document["kind"] == "ServiceMonitor":
            continue  # no schema: see the test below
        validated = kubernetes_validate.validate(document, version, strict=True)
        assert validated == version


def test_strict_validation_rejects_unknown_fields() -> None:
    # The schema test means something only if a misspelt field fails it.
    document = deployment("gpu")
    probe = document["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["servce"] = probe["grpc"].pop("service")
    with pytest.raises(kubernetes_validate.ValidationError, match="servce"):
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)


def test_kubernetes_validate_has_no_servicemonitor_schema() -> None:
    # A CRD: kubernetes-validate raises SchemaNotFoundError (its command line only warns
    # and passes the file). Its fields are checked by hand below instead.
    monitor = one("ServiceMonitor")
    for version in KUBERNETES_VERSIONS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(monitor, version, strict=True)
    # Every other object has a schema, so nothing else goes unvalidated.
    kinds = {o["kind"] for o in objects()}
    assert kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }


# The ServiceMonitor fields used here, as the Prometheus Operator's monitoring.coreos.com/v1
# API reference names them; a misspelt one would be silently ignored by nothing but the
# CRD's own schema, which the suite does not have.
SERVICEMONITOR_SPEC_FIELDS = {"selector", "endpoints", "namespaceSelector", "jobLabel"}
SERVICEMONITOR_ENDPOINT_FIELDS = {
    "port",
    "path",
    "interval",
    "scrapeTimeout",
    "scheme",
    "relabelings",
    "metricRelabelings",
}


def test_the_servicemonitor_scrapes_the_metrics_port_of_one_service() -> None:
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= SERVICEMONITOR_SPEC_FIELDS
    services = [
        o
        for o in objects()
        if o["kind"] == "Service"
        and selects(monitor["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])
    ]
    # Only the ClusterIP Service: the headless one would scrape every pod a second time.
    assert [s["metadata"]["name"] for s in services] == ["salience"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= SERVICEMONITOR_ENDPOINT_FIELDS
    (metrics,) = [p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert metrics["targetPort"] == "metrics"
    for variant in DEPLOYMENTS:
        assert port_numbers(variant)["metrics"] == settings(variant).metrics_port
    assert endpoint["path"] == "/metrics"
    interval, timeout = (int(endpoint[k].removesuffix("s")) for k in ("interval", "scrapeTimeout"))
    assert 0 < timeout <= interval


def test_the_kustomization_applies_every_manifest_once() -> None:
    kustomization = load(KUBERNETES / "kustomization.yaml")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    # Every manifest but the other Deployment variant: both define Deployment `salience`.
    expected = {p.name for p in MANIFESTS} - {"deployment-cpu.yaml"}
    assert set(resources) == expected
    assert "prometheus-adapter" not in str(resources)  # cluster-wide, installed by Helm


# --- the Deployments ---------------------------------------------------------------


@pytest.mark.parametrize("variant", DEPLOYMENTS)
def test_selectors_select_the_pods(variant: str) -> None:
    spec = deployment(variant)["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], labels)
    services = [o for o in objects() if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"salience", "salience-headless"}
    for service in services:
        assert selects(service["spec"]["selector"], labels)
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize("variant", DEPLOYMENTS)
def test_ports_and_probes_are_the_servers(variant: str) -> None:
    server = settings(variant)
    ports = port_numbers(variant)
    assert ports == {"grpc": server.port, "metrics": server.metrics_port}
    main = container(variant)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The whole server (""): SERVING once every model is loaded and warmed up.
        assert main[kind]["grpc"] == {"port": ports["grpc"], "service": ""}, kind
    # Liveness only starts once the startup probe passed: the startup probe must allow
    # for loading, or liveness would restart a pod that is still loading its models.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[kind]["timeoutSeconds"] < main[kind]["periodSeconds"]


def test_the_services_forward_to_the_container_ports() -> None:
    ports = port_numbers("gpu")
    service = one("Service", "salience")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (ports["grpc"], "grpc"),
        "metrics": (ports["metrics"], "metrics"),
    }
    headless = one("Service", "salience-headless")
    # Headless: DNS answers with every ready pod's address, for client-side balancing;
    # the port is the pods' own, since clients connect to them directly.
    assert headless["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [
        ("grpc", ports["grpc"], "grpc")
    ]


@pytest.mark.parametrize("variant", DEPLOYMENTS)
def test_termination_grace_covers_the_prestop_sleep_and_the_drain(variant: str) -> None:
    pod = deployment(variant)["spec"]["template"]["spec"]
    sleep = container(variant)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = settings(variant).shutdown_grace_seconds
    # Kubernetes counts terminationGracePeriodSeconds from the start of preStop; the
    # server gets SIGTERM after the sleep and drains for its grace from then on.
    assert pod["terminationGracePeriodSeconds"] - sleep - drain >= EXIT_MARGIN_SECONDS
    # Long enough for endpoint removal to reach kube-proxy and DNS (whose records
    # CoreDNS caches for 5 s by default).
    assert sleep >= 5
    # The drain was set on purpose, not left at the default.
    assert "SALIENCE_SHUTDOWN_GRACE_SECONDS" in env(variant)


@pytest.mark.parametrize("variant", DEPLOYMENTS)
def test_security_context(variant: str) -> None:
    pod = deployment(variant)["spec"]["template"]["spec"]
    main = container(variant)
    (user,) = [i for i in dockerfile() if i.keyword == "USER"]
    assert user.stage == stage_count(dockerfile()) - 1
    uid, _, gid = user.arguments.partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # The one writable place: /tmp (HOME in the image) on an emptyDir.
    (mount,) = main["volumeMounts"]
    (volume,) = pod["volumes"]
    assert (mount["mountPath"], mount["name"]) == ("/tmp", volume["name"])
    assert "emptyDir" in volume


def test_service_links_are_off_because_they_would_set_salience_port() -> None:
    # Kubernetes gives every pod <SERVICE>_PORT=tcp://IP:PORT (and more) for each
    # Service with a cluster IP in its namespace; for the Service `salience` that is
    # SALIENCE_PORT, which the server reads as its own port, and cannot parse.
    injected = set()
    for service in (o for o in objects() if o["kind"] == "Service"):
        if service["spec"].get("clusterIP") == "None":
            continue  # headless Services get no variables
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        injected |= {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    assert "SALIENCE_PORT" in injected
    with pytest.raises(SettingsError, match=re.escape("SALIENCE_PORT='tcp://10.0.0.7:50051'")):
        Settings.load(environ={"SALIENCE_PORT": "tcp://10.0.0.7:50051"})
    for variant in DEPLOYMENTS:
        assert deployment(variant)["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_the_gpu_and_cpu_deployments_differ_only_in_image_resources_and_placement() -> None:
    gpu, cpu = deployment("gpu"), deployment("cpu")
    gpu_container, cpu_container = container("gpu"), container("cpu")
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(cpu_container["resources"])
    gpu_pod = gpu["spec"]["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod[
        "tolerations"
    ]
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version
    assert gpu_container["image"] == f"salience:{version.group(1)}-gpu"
    assert cpu_container["image"] == f"salience:{version.group(1)}"
    for variant in (gpu, cpu):
        resources = variant["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]

    def without_differences(document: dict[str, Any]) -> dict[str, Any]:
        stripped = copy.deepcopy(document)
        pod = stripped["spec"]["template"]["spec"]
        pod.pop("nodeSelector", None)
        pod.pop("tolerations", None)
        for c in pod["containers"]:
            c.pop("image")
            c.pop("resources")
        return stripped

    assert without_differences(gpu) == without_differences(cpu)


@pytest.mark.parametrize("path", [*MANIFESTS, ADAPTER_VALUES], ids=lambda p: p.name)
def test_every_salience_variable_is_a_setting(path: Path) -> None:
    assert unknown_variables(variables_in_text(path)) == []


@pytest.mark.parametrize("variant", DEPLOYMENTS)
def test_environment_values_are_valid_settings(variant: str) -> None:
    # Settings.load parses and validates every value as the server does at start-up.
    server = settings(variant)
    assert server.shutdown_grace_seconds == float(env(variant)["SALIENCE_SHUTDOWN_GRACE_SECONDS"])
    # Round-robin clients of the headless Service find new pods only when they resolve
    # its name again, which they do when a connection closes: connections must age out.
    assert server.max_connection_age_seconds > 0
    # The probes speak plaintext (Kubernetes' gRPC probes cannot do TLS).
    assert server.tls_cert_file is None


# --- scaling -----------------------------------------------------------------------


def test_the_hpa_scales_the_deployment_on_queue_depth() -> None:
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    for variant in DEPLOYMENTS:
        document = deployment(variant)
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            document["apiVersion"],
            document["kind"],
            document["metadata"]["name"],
        )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "salience_queue_depth"
    average = float(metric["pods"]["target"]["averageValue"])
    # Pods are added well before a queue is full and requests are refused.
    assert 0 < average < Settings().max_queue_size
    # Two pods, so the disruption budget can take one while the other serves.
    pdb = one("PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_server_exports_the_hpa_metric_per_model() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.queue_depth.labels("shapes").set(3)
    metrics.queue_depth.labels("steering").set(4)
    text = generate_latest(registry).decode()
    assert "# TYPE salience_queue_depth gauge" in text
    assert 'salience_queue_depth{model="shapes"} 3.0' in text
    assert 'salience_queue_depth{model="steering"} 4.0' in text


def adapter_rule() -> dict[str, Any]:
    (rule,) = load(ADAPTER_VALUES)["rules"]["custom"]
    return rule


def test_the_adapter_rule_serves_the_hpa_metric_for_pods() -> None:
    rule = adapter_rule()
    hpa_metric = one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == hpa_metric
    assert re.fullmatch(rule["name"]["matches"], "salience_queue_depth")
    # The labels the Prometheus Operator puts on every scraped series name the pod.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make install-test` installs it (Debian package prometheus)"
        )
    return found


def test_the_adapter_query_sums_a_pods_model_queues(tmp_path: Path) -> None:
    # The adapter fills the rule's template for a Pods metric request like this one:
    # the pods of one namespace, grouped by pod. promtool evaluates the result on
    # series as the ServiceMonitor scrapes them every 15 s.
    rule = adapter_rule()
    matchers = 'namespace="prod",pod=~"salience-a|salience-b"'
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "salience_queue_depth")
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query
    series = {
        # Pod a: two models. Averages over the minute 4 and 5 (the last value, 8, alone
        # would give 12); the first sample equals the mean of the rest, so the average
        # is the same whether the window includes its left edge (Prometheus 2) or not (3).
        'salience_queue_depth{namespace="prod",pod="salience-a",model="shapes"}': "4 4 4 4 4",
        'salience_queue_depth{namespace="prod",pod="salience-a",model="steering"}': "5 2 6 4 8",
        'salience_queue_depth{namespace="prod",pod="salience-b",model="shapes"}': "1 1 1 1 1",
        # Not asked for: another pod, and the same pod name in another namespace.
        'salience_queue_depth{namespace="prod",pod="salience-c",model="shapes"}': "50 50 50 50 50",
        'salience_queue_depth{namespace="dev",pod="salience-a",model="shapes"}': "70 70 70 70 70",
    }
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "1m",
                        "exp_samples": [
                            {"labels": '{pod="salience-a"}', "value": 9},
                            {"labels": '{pod="salience-b"}', "value": 1},
                        ],
                    },
                    {
                        # The adapter's discovery query finds every such series.
                        "expr": f"count({rule['seriesQuery']})",
                        "eval_time": "1m",
                        "exp_samples": [{"labels": "{}", "value": 5}],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "adapter.test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
