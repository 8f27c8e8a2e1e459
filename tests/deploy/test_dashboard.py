"""The Grafana dashboard's structure: every panel queries the provisioned Prometheus
data source, the required panels are there, per-model panels follow the `model`
variable, the provisioning files agree with the compose stack's mounts, and every
metric a query (or an alert) names is one a real server exposes.
"""

from __future__ import annotations

import itertools
import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, running_server
from tests.deploy.observability import (
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    DEPLOY,
    DEVICE_MEMORY_METRIC,
    DEVICE_MEMORY_PANEL,
    alert_rules,
    dashboard,
    load_yaml,
    metric_names,
    panels,
    program,
    save_linear_model,
    targets,
)

REQUIRED_PANELS = {
    "Request rate",
    "Error ratio",
    "Latency percentiles",
    "Queue wait",
    "Batch size distribution",
    "Device compute time",
    "Samples computed",
    "Requests in flight",
    "Queue depth",
    "Model versions by state",
    "Request and response size",
    "Refused requests",
    DEVICE_MEMORY_PANEL,
}
# Panels over every model, each for a reason: the gauges and byte histograms have no
# model label, and a model that failed to load has no traffic, so it is never in the
# `model` variable's values, yet its versions are what the panel is for.
ALL_MODEL_PANELS = {
    "Requests in flight",
    "Request and response size",
    "Model versions by state",
    DEVICE_MEMORY_PANEL,
}


def datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uid: str = source["uid"]
    return uid


def test_every_panel_queries_the_provisioned_prometheus() -> None:
    board = dashboard()
    uid = datasource_uid()
    assert board["uid"] == "salience"
    assert board["schemaVersion"] >= 39
    shown = panels(board)
    assert {p["title"] for p in shown} >= REQUIRED_PANELS
    assert len({p["title"] for p in shown}) == len(shown)
    for panel in shown:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], f"panel {title!r} has no query"
        assert panel["description"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), title
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, title
            assert target["expr"].strip(), title
            assert target["legendFormat"], title
        if title in ALL_MODEL_PANELS:
            assert not any("$model" in t["expr"] for t in panel["targets"]), title
        else:
            # Every selector of a per-model panel follows the selection.
            for target in panel["targets"]:
                selectors = target["expr"].count("{")
                assert target["expr"].count('model=~"$model"') == selectors, (title, target)


def test_the_model_variable_lists_the_models_with_traffic() -> None:
    (variable,) = dashboard()["templating"]["list"]
    assert variable["name"] == "model"
    assert variable["datasource"] == {"type": "prometheus", "uid": datasource_uid()}
    assert variable["definition"] == "label_values(salience_requests_total, model)"
    assert variable["query"]["query"] == variable["definition"]
    # Several models at once: queries match them with =~.
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    assert variable["allValue"] == ".*"


def test_the_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for cell in itertools.product(
            range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        ):
            assert cell not in cells, (panel["title"], cells[cell])
            cells[cell] = panel["title"]


def test_the_provisioning_matches_the_compose_mounts() -> None:
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    grafana = services["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    # Prometheus gets the whole directory: its configuration names alerts.yml beside it.
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def test_a_missing_program_fails_with_how_to_install_it() -> None:
    with pytest.raises(AssertionError, match="make install-test"):
        program("no-such-prometheus-program")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = save_linear_model(tmp_path_factory.mktemp("dashboard-repo"), "linear")
    with running_server(repo, metrics_port=0) as running:
        yield running


def exposed_names(body: str) -> set[str]:
    """Every series name the exposition declares, with the suffixes its type gives its
    samples: counters end in _total, histograms have _bucket, _count and _sum. Read
    from the TYPE lines, so families that have no sample yet (no request) count."""
    names: set[str] = set()
    for family in text_string_to_metric_families(body):
        names |= {
            "counter": {f"{family.name}_total"},
            "histogram": {f"{family.name}_{s}" for s in ("bucket", "count", "sum")},
        }.get(family.type, {family.name})
    return names


def test_every_metric_a_query_names_is_exposed_by_the_server(server: RunningServer) -> None:
    port = server.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    exposed = exposed_names(body) | {"up"}  # `up` is Prometheus's own, per target
    used = {name for _, expr in targets(dashboard()) for name in metric_names(expr)}
    used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    used.add("salience_requests_total")  # the model variable's source
    assert used - exposed == {DEVICE_MEMORY_METRIC}
    # Device memory is exposed only by a server on a GPU (this one is on the CPU):
    # the name the dashboard uses is the one the server registers there.
    assert not server.server.placement.is_gpu
    from salience_server.metrics import Metrics

    gpu = Metrics(CollectorRegistry())
    gpu.track_device_memory("/GPU:0", lambda: {"current": 1, "peak": 2})
    names = {
        sample.name
        for family in gpu.registry.collect()
        for sample in family.samples
        if sample.name == DEVICE_MEMORY_METRIC
    }
    assert names == {DEVICE_MEMORY_METRIC}
    # And the dashboard names it only on its own panel.
    users = {title for title, expr in targets(dashboard()) if DEVICE_MEMORY_METRIC in expr}
    assert users == {DEVICE_MEMORY_PANEL}


def test_the_deploy_readme_lists_every_metric_family(server: RunningServer) -> None:
    port = server.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {
        f"{f.name}_total" if f.type == "counter" else f.name
        for f in text_string_to_metric_families(body)
        if f.name.startswith("salience_")
    }
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("## Metrics, dashboard and alerts", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(salience_[a-z_]+)` \|", section, re.MULTILINE))
    assert listed == families | {DEVICE_MEMORY_METRIC}
    # Every alert and every panel is described there too.
    for rule in alert_rules():
        assert f"| `{rule['alert']}` |" in section, rule["alert"]
    for panel in panels(dashboard()):
        assert f"\n| {panel['title']} |" in section, panel["title"]
