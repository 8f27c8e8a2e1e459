"""deploy/compose.yaml brought up for real with Compose v2 (marker `image`:
`make image-test`), in the tests' own Docker engine, on the image built from this
checkout.

The stack is the file's own; an override file (written by the test) changes only what
a shared machine or a closed network needs: every published port on a free port of
127.0.0.1, and, where no registry answers, the Prometheus image (a stand-in built on
the stand-in base with Debian's Prometheus, started as the official image starts).
The test sees Prometheus scrape `salience` (job `salience`, `salience:8000`) as up
and load every alert rule of deploy/prometheus/alerts.yml, evaluated with health ok.

Grafana: its image is used when it can be pulled, and the test then sees the
provisioned dashboard and datasource in Grafana's API. Where it cannot, the test says
so, and runs the `grafana` service's container on the stand-in base instead, to check
that the provisioning files and the dashboard are mounted, unchanged, where Grafana
reads them (/etc/grafana/provisioning, and the dashboard provider's folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import BuiltImage
from tests.deploy.deploy_files import COMPOSE, DEPLOY
from tests.deploy.engine import ROOT, Engine, compose_binary, free_ports, run_checked
from tests.deploy.observability import alert_rules

pytestmark = pytest.mark.image

STANDIN_BASE = "salience-standin/python:3.11-slim-bookworm"
STANDIN_PROMETHEUS = "salience-standin/prometheus:debian"
PROMETHEUS_DOCKERFILE = Path(__file__).parent / "standin" / "prometheus.Dockerfile"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "dashboards"
# Prometheus scrapes every 15 s (prometheus.yml): two intervals and some.
SCRAPE_WAIT_S = 60.0
READY_VERSIONS = 'salience_model_versions{job="salience", state="ready"}'


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def pullable(engine: Engine, image: str) -> bool:
    present = engine.docker("image", "inspect", image, check=False).returncode == 0
    return present or engine.docker("pull", "-q", image, check=False, timeout=300).returncode == 0


def standin_base(engine: Engine) -> str:
    # Already imported when the image was built on it; made (or imported) otherwise.
    run_checked([str(ROOT / "scripts" / "standin-base.sh"), STANDIN_BASE], engine.env)
    return STANDIN_BASE


@dataclass
class Stack:
    engine: Engine
    compose: list[str]
    prometheus_url: str
    grafana_url: str
    real_grafana: bool

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series."""
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        result: list[dict[str, Any]] = http_json(url)["data"]["result"]
        return result

    def run(self, *args: str, timeout: float = 600) -> str:
        return run_checked([*self.compose, *args], self.engine.env, timeout=timeout).stdout


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def wait_for(what: str, check: Any, timeout: float = SCRAPE_WAIT_S) -> Any:
    """Polls `check` until it returns something true; fails with the last value."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = check()
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as err:
            last = err
        else:
            if last:
                return last
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen: {last!r}")


@pytest.fixture(scope="module")
def stack(
    engine: Engine, image: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    services = compose_services()
    assert services["salience"]["image"] == image.name
    overrides: dict[str, Any] = {}
    prometheus_image = services["prometheus"]["image"]
    if not pullable(engine, prometheus_image):
        print(f"\ncompose: {prometheus_image} cannot be pulled: Debian's Prometheus instead")
        run_checked(
            [
                engine.client, "build", "--network", "host", "--build-arg",
                f"BASE={standin_base(engine)}", "-t", STANDIN_PROMETHEUS,
                "-f", str(PROMETHEUS_DOCKERFILE), str(PROMETHEUS_DOCKERFILE.parent),
            ],
            engine.env,
        )  # fmt: skip
        overrides["prometheus"] = {"image": STANDIN_PROMETHEUS}
    grafana_image = services["grafana"]["image"]
    real_grafana = pullable(engine, grafana_image)
    if not real_grafana:
        print(
            f"\ncompose: {grafana_image} cannot be pulled here: Grafana itself is not run; "
            "its service's mounts are checked in a container of the stand-in base"
        )
        overrides["grafana"] = {"image": standin_base(engine)}
    ports = iter(free_ports(4))
    for name, service in services.items():
        published = []
        for mapping in service.get("ports", []):
            _, _, container_port = str(mapping).rpartition(":")
            published.append(f"127.0.0.1:{next(ports)}:{container_port}")
        overrides.setdefault(name, {})["ports"] = published
    override = tmp_path_factory.mktemp("compose") / "compose.override.yaml"
    # `!override` replaces the file's port lists instead of adding to them.
    text = yaml.safe_dump({"services": overrides}, sort_keys=False)
    override.write_text(text.replace("ports:", "ports: !override"))
    published = {
        name: {p.rpartition(":")[2]: p.split(":")[1] for p in o["ports"]}
        for name, o in overrides.items()
    }
    compose = [
        compose_binary(), "--project-name", f"salience-test-{os.getpid()}",
        "--file", str(COMPOSE), "--file", str(override),
    ]  # fmt: skip
    stack = Stack(
        engine,
        compose,
        f"http://127.0.0.1:{published['prometheus']['9090']}",
        f"http://127.0.0.1:{published['grafana']['3000']}",
        real_grafana,
    )
    up = ["salience", "prometheus", *(["grafana"] if real_grafana else [])]
    start = time.monotonic()
    try:
        # --wait: until the salience service's healthcheck says healthy.
        stack.run("up", "--detach", "--no-build", "--pull", "never", "--wait",
                  "--wait-timeout", "300", *up)  # fmt: skip
        took = time.monotonic() - start
        print(f"\ncompose: {', '.join(up)} up, salience healthy, in {took:.1f} s")
        yield stack
    finally:
        run_checked([*compose, "down", "--volumes", "--remove-orphans", "--timeout", "40"],
                    engine.env)  # fmt: skip


def test_prometheus_scrapes_salience_as_up(stack: Stack) -> None:
    def salience_targets() -> list[dict[str, Any]]:
        data = http_json(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
        found = [t for t in data if t["labels"].get("job") == "salience"]
        return found if found and all(t["health"] == "up" for t in found) else []

    (target,) = wait_for("Prometheus scraping salience as up", salience_targets)
    assert target["scrapeUrl"] == "http://salience:8000/metrics"
    assert target["labels"]["instance"] == "salience:8000"
    assert target["lastError"] == ""
    (series,) = stack.query('up{job="salience"}')
    assert series["value"][1] == "1"
    # Something the server exports, scraped through the stack's network.
    ready = {s["metric"]["model"]: s["value"][1] for s in stack.query(READY_VERSIONS)}
    assert ready == {"shapes": "1", "shapes-spurious": "1", "steering": "1"}
    print("\ncompose: Prometheus scrapes salience:8000 (job salience) as up")


def test_prometheus_loads_and_evaluates_every_alert_rule(stack: Stack) -> None:
    expected = sorted(rule["alert"] for rule in alert_rules())

    def evaluated() -> list[dict[str, Any]]:
        groups = http_json(f"{stack.prometheus_url}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
        # health is "unknown" until a rule's first evaluation.
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = wait_for("every alert rule evaluated", evaluated)
    assert sorted(r["name"] for r in rules) == expected
    assert {r["name"]: (r["health"], r.get("lastError", "")) for r in rules} == {
        name: ("ok", "") for name in expected
    }
    print(f"\ncompose: Prometheus loaded and evaluated all {len(expected)} alert rules, health ok")


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# Run in the grafana service's container: what is mounted where Grafana reads it.
MOUNT_PROBE = r"""
import hashlib, json, pathlib
def digests(folder):
    root = pathlib.Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
print(json.dumps({"provisioning": digests("/etc/grafana/provisioning"),
                  "dashboards": digests("/var/lib/grafana/dashboards")}))
"""


def test_grafana_gets_its_provisioning_and_dashboard(stack: Stack) -> None:
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "salience.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((GRAFANA_DASHBOARDS / "salience.json").read_text())
    if stack.real_grafana:
        found = wait_for(
            "Grafana serving the provisioned dashboard",
            lambda: http_json(f"{stack.grafana_url}/api/search?type=dash-db"),
        )
        assert [d["title"] for d in found] == [dashboard["title"]]
        assert found[0]["folderTitle"] == provider["folder"]
        print("\ncompose: Grafana serves the provisioned dashboard")
        return
    # `run` starts the service's container as compose defines it (its mounts), without
    # Grafana in it: the image is the stand-in base.
    output = stack.run(
        "run", "--rm", "--no-deps", "--no-TTY", "--entrypoint", "python", "grafana",
        "-c", MOUNT_PROBE,
    )  # fmt: skip
    seen = json.loads(output.strip().splitlines()[-1])
    assert seen["provisioning"] == digests(GRAFANA_PROVISIONING)
    assert seen["dashboards"] == digests(GRAFANA_DASHBOARDS)
    assert "datasources/prometheus.yml" in seen["provisioning"]
    assert "dashboards/salience.yml" in seen["provisioning"]
    assert "salience.json" in seen["dashboards"]
    print(
        "\ncompose: Grafana not run (its image cannot be pulled here); its provisioning "
        "and dashboard are mounted unchanged at /etc/grafana/provisioning and "
        "/var/lib/grafana/dashboards"
    )
