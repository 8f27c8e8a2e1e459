"""The alert rules under deploy/prometheus/ as Prometheus's own tools see them:
`promtool check` accepts the rules and the compose stack's configuration, `promtool
test rules` runs the synthetic-series unit tests of alerts.test.yml, and those unit
tests are shown to have teeth: a copy of the rules with one alert broken fails them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.deploy.observability import (
    ALERT_TESTS,
    ALERTS,
    ERROR_RATIO_ALERT,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    alert_rule,
    alert_rules,
    codes_matched,
    dashboard,
    duration_seconds,
    load_yaml,
    program,
    targets,
)

ALERT_NAMES = [
    "SalienceHighErrorRatio",
    "SaliencePredictLatencyHigh",
    "SalienceExplainLatencyHigh",
    "SalienceQueueNearFull",
    "SalienceModelFailedToLoad",
    "SalienceModelIdle",
    "SalienceTargetDown",
]
# Server-side failures and overload (alerts.yml says why each is in or out).
SERVER_CODES = {
    "INTERNAL",
    "UNKNOWN",
    "DATA_LOSS",
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
}
CALLER_CODES = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "UNIMPLEMENTED",
    "CANCELLED",
}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout


def test_the_compose_configuration_scrapes_the_server_and_loads_the_rules() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool found the rule file through the relative path and checked it too.
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    # SalienceTargetDown selects this job name.
    assert job["job_name"] == "salience"
    assert job["static_configs"] == [{"targets": ["salience:8000"]}]


def test_the_unit_tests_of_every_alert_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def expectations() -> dict[str, list[list[dict[str, Any]]]]:
    """The expected firing alerts of every evaluation in alerts.test.yml, by alert."""
    found: dict[str, list[list[dict[str, Any]]]] = {}
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            found.setdefault(check["alertname"], []).append(check.get("exp_alerts") or [])
    return found


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    assert [rule["alert"] for rule in alert_rules()] == ALERT_NAMES
    checks = expectations()
    assert set(checks) == set(ALERT_NAMES)
    for name in ALERT_NAMES:
        # At least one evaluation where it must fire and one where it must not
        # (before its `for` has passed); the firing ones list their full labels.
        assert any(not alerts for alerts in checks[name]), name
        firing = [alert for alerts in checks[name] for alert in alerts]
        assert firing, name
        severity = alert_rule(name)["labels"]["severity"]
        for alert in firing:
            assert alert["exp_labels"]["severity"] == severity
            assert set(alert["exp_annotations"]) == {"summary", "description"}


def broken_copy(tmp_path: Path, name: str, change: dict[str, Any]) -> Path:
    """alerts.yml and its unit tests in tmp_path, with one alert's fields changed."""
    rules = load_yaml(ALERTS)
    (rule,) = (r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)
    rule.update(change)
    tmp_path.mkdir()
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    return tmp_path


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_the_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path, name: str) -> None:
    # An alert that can never fire breaks its firing expectations ...
    never = broken_copy(tmp_path / "never", name, {"expr": "vector(1) > 2"})
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=never)
    assert result.returncode == 1, result.stdout
    # promtool reports each failed expectation, naming its alert, on stderr.
    assert f"alertname: {name}" in result.stderr
    # ... and one without its `for` fires at an evaluation where it must still wait,
    # or on a series meant to stay below the threshold for too short a time.
    hasty = broken_copy(tmp_path / "hasty", name, {"for": "0s"})
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=hasty)
    assert result.returncode == 1, result.stdout
    assert f"alertname: {name}" in result.stderr
    # The unchanged copy passes, so the failures above come from the change.
    intact = broken_copy(tmp_path / "intact", name, {})
    assert promtool("test", "rules", ALERT_TESTS.name, cwd=intact).returncode == 0


def test_every_alert_waits_is_graded_and_says_which_model() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert duration_seconds(rule["for"]) >= 60, name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        if name == "SalienceTargetDown":
            # `up` has no model label: a target is a server, named by its instance.
            assert "{{ $labels.instance }}" in annotations["summary"]
            continue
        for text in annotations.values():
            assert "{{ $labels.model }}" in text, name


def test_the_error_ratio_counts_server_failures_and_overload_only() -> None:
    expr = alert_rule(ERROR_RATIO_ALERT)["expr"]
    counted = codes_matched(expr)
    assert counted == SERVER_CODES
    assert not counted & CALLER_CODES
    # Every name is a real status code (a typo would silently match nothing).
    assert counted <= {code.name for code in grpc.StatusCode}
    # The description lists exactly these codes.
    description = alert_rule(ERROR_RATIO_ALERT)["annotations"]["description"]
    listed = re.search(r"\(([A-Z_, \n]+)\)", description)
    assert listed is not None
    assert {c.strip() for c in listed.group(1).split(",")} == SERVER_CODES
    # The dashboard's "server-side" error ratio is the alert's.
    (panel_expr,) = (
        e for title, e in targets(dashboard()) if title == "Error ratio" and "code=~" in e
    )
    assert codes_matched(panel_expr) == SERVER_CODES
