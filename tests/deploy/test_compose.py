"""deploy/compose.yaml, checked without running it (test_compose_stack.py runs it).

The file parses into the three services; the build context is the repository with its
Dockerfile, and the build arguments are ones the Dockerfile declares; every host path
mounted exists; the published ports are the server's settings and the documented
ones; the health check is the image's; the stop grace outlasts the server's drain;
every SALIENCE_* variable is a valid setting; Prometheus finds its configuration, its
rule files and the server's metrics port at the service's name; Grafana finds its
provisioning and the folder its dashboard provider reads.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from salience_server.settings import Settings
from tests.deploy.deploy_files import (
    COMPOSE,
    DEPLOY,
    REPO,
    args_defaults,
    dockerfile,
    exec_form,
    stage_count,
    unknown_variables,
    variables_in_text,
    yaml_documents,
)

# The ports deploy/README.md gives for the stack, by service.
DOCUMENTED_PORTS = {"salience": {50051, 8000}, "prometheus": {9090}, "grafana": {3000}}
# Seconds the server needs after its drain to release the models and exit.
EXIT_MARGIN_SECONDS = 5


def compose() -> dict[str, Any]:
    (document,) = yaml_documents(COMPOSE)
    return document


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    return services[name]


def environment(name: str) -> dict[str, str]:
    value = service(name).get("environment", {})
    if isinstance(value, list):  # the KEY=VALUE list form
        value = dict(item.partition("=")[::2] for item in value)
    return {str(k): str(v) for k, v in value.items()}


def server_settings() -> Settings:
    """The settings the compose service's server starts with (its variables over the
    defaults, parsed and validated as the server does).
    """
    return Settings.load(environ=environment("salience"))


def mounts(name: str) -> list[tuple[Path, PurePosixPath]]:
    """(host path, container path) of a service's bind mounts, host paths resolved
    against the compose file's folder as compose resolves them.
    """
    found = []
    for volume in service(name).get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume["source"], volume["target"]
        else:
            source, target, *_ = volume.split(":")
        assert source.startswith((".", "/")), f"{name}: {volume} is not a bind mount"
        found.append(((COMPOSE.parent / source).resolve(), PurePosixPath(target)))
    return found


def host_path(name: str, inside: str) -> Path:
    """Where a path inside a service's container comes from on the host."""
    target = PurePosixPath(inside)
    for source, mounted in sorted(mounts(name), key=lambda m: -len(m[1].parts)):
        if target == mounted or mounted in target.parents:
            return source.joinpath(*target.parts[len(mounted.parts) :])
    raise AssertionError(f"{inside} is not mounted into {name}")


def seconds(duration: str) -> float:
    """A compose duration (Go syntax: 1m30s, 20s, 500ms) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts, duration
    assert "".join(n + u for n, u in parts) == duration, duration
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def published(name: str) -> dict[int, int]:
    """container port → host port of a service."""
    ports = {}
    for entry in service(name).get("ports", []):
        host, _, container = str(entry).rpartition(":")
        ports[int(container)] = int(host)
    return ports


def test_the_stack_has_the_server_prometheus_and_grafana() -> None:
    assert set(compose()["services"]) == set(DOCUMENTED_PORTS)


def test_the_build_is_the_repositorys_dockerfile() -> None:
    build = service("salience")["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO
    assert (REPO / build.get("dockerfile", "Dockerfile")).is_file()
    instructions = dockerfile()
    declared = {
        k: v
        for stage in range(-1, stage_count(instructions))
        for k, v in args_defaults(instructions, stage).items()
    }
    assert set(build.get("args", {})) <= set(declared)
    # The CPU image, as the Dockerfile builds by default.
    assert build["args"]["SERVER_EXTRA"] == declared["SERVER_EXTRA"] == "server-cpu"


@pytest.mark.parametrize("name", sorted(DOCUMENTED_PORTS))
def test_every_mounted_host_path_exists(name: str) -> None:
    for source, _ in mounts(name):
        assert source.exists(), f"{name} mounts {source}, which is not in the repository"
        assert source.is_relative_to(DEPLOY)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_PORTS))
def test_published_ports_are_the_documented_ones(name: str) -> None:
    ports = published(name)
    assert set(ports) == DOCUMENTED_PORTS[name]
    assert all(host == container for container, host in ports.items())


def test_the_servers_ports_are_its_settings() -> None:
    settings = server_settings()
    assert set(published("salience")) == {settings.port, settings.metrics_port}
    defaults = Settings()
    assert (settings.port, settings.metrics_port) == (defaults.port, defaults.metrics_port)


def test_the_healthcheck_is_the_images() -> None:
    (check,) = [i for i in dockerfile() if i.keyword == "HEALTHCHECK"]
    flags = check.flags()
    healthcheck = service("salience")["healthcheck"]
    assert healthcheck["test"] == ["CMD", *exec_form(check.rest().removeprefix("CMD "))]
    for key in ("interval", "timeout", "start_period", "retries"):
        docker = flags[key.replace("_", "-")]
        assert str(healthcheck[key]) == docker, key


def test_the_stop_grace_outlasts_the_servers_drain() -> None:
    drain = server_settings().shutdown_grace_seconds
    stop = seconds(service("salience")["stop_grace_period"])
    # Docker sends SIGKILL stop_grace_period after SIGTERM; the server drains for its
    # grace from SIGTERM, then releases the models.
    assert stop - drain >= EXIT_MARGIN_SECONDS
    # Set on purpose rather than left at the default.
    assert "SALIENCE_SHUTDOWN_GRACE_SECONDS" in environment("salience")


def test_every_salience_variable_is_a_setting() -> None:
    assert unknown_variables(variables_in_text(COMPOSE)) == []
    assert unknown_variables(environment("salience")) == []
    server_settings()  # and every value is one the server accepts


def test_the_server_runs_locked_down() -> None:
    salience = service("salience")
    assert salience["read_only"] is True
    # /tmp is HOME in the image: the one writable place, as in Kubernetes.
    assert salience["tmpfs"] == ["/tmp"]
    assert salience["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in salience["security_opt"]


def test_prometheus_reads_its_config_and_rules_and_scrapes_the_server() -> None:
    # The image's default --config.file; compose does not override the command.
    assert "command" not in service("prometheus")
    config_path = host_path("prometheus", "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(config_path.read_text())
    rule_files = config.get("rule_files", [])
    assert rule_files, "no alert rules configured"
    for rule_file in rule_files:
        # Relative rule files are relative to the configuration file.
        inside = PurePosixPath("/etc/prometheus") / rule_file
        assert host_path("prometheus", str(inside)).is_file(), rule_file
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert f"salience:{server_settings().metrics_port}" in targets


def test_grafana_is_provisioned_with_the_datasource_and_dashboards() -> None:
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    datasources = [
        d
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for d in yaml.safe_load(path.read_text())["datasources"]
    ]
    assert [d["url"] for d in datasources if d["type"] == "prometheus"] == [
        f"http://prometheus:{next(iter(published('prometheus')))}"
    ]
    providers = [
        p
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(path.read_text())["providers"]
    ]
    assert providers, "no dashboard provider"
    for provider in providers:
        # The folder the provider reads inside the container is the mounted dashboards.
        folder = host_path("grafana", provider["options"]["path"])
        assert folder == DEPLOY / "grafana" / "dashboards"
        assert sorted(folder.glob("*.json")), f"{folder} has no dashboard"
