"""What the monitoring tests share: the files under deploy/ (alert rules, the Grafana
dashboard and its provisioning), the Prometheus programs they run, and a tiny model
repository for a real server.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "salience.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "salience.yml"

# The one panel allowed to have no data on a CPU-only server: the gauge behind it
# exists only where the server placed its models on a GPU (deploy/README.md says so).
DEVICE_MEMORY_PANEL = "Device memory"
DEVICE_MEMORY_METRIC = "salience_device_memory_bytes"
ERROR_RATIO_ALERT = "SalienceHighErrorRatio"

INSTALL_HINT = "install it with `make install-test` (Debian package `prometheus`)"


def program(name: str) -> str:
    """The path of a Prometheus program; fails (never skips) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/bin")
    assert found is not None, f"{name} is not installed: {INSTALL_HINT}"
    return found


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml, in file order."""
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_rule(name: str) -> dict[str, Any]:
    (rule,) = (rule for rule in alert_rules() if rule["alert"] == name)
    return rule


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data: rows (and panels collapsed inside them) unfolded."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel."""
    return [
        (panel["title"], target["expr"]) for panel in panels(board) for target in panel["targets"]
    ]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (string literals left out, so
    label values such as job="salience" are not mistaken for names)."""
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\b(?:salience_[a-z_]+|up|ALERTS)\b", code))


def duration_seconds(text: str) -> int:
    """A Prometheus duration such as `1h30m` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", text))


def codes_matched(expr: str) -> set[str]:
    """The status codes of the `code=~"A|B"` matcher of an expression (exactly one)."""
    (codes,) = re.findall(r'code=~"([A-Z_|]+)"', expr)
    return set(codes.split("|"))


def substitute(expr: str, model: str, rate_interval: str, interval: str = "15s") -> str:
    """A dashboard query as Grafana sends it: `$model` is the selection (a regex, as
    Grafana formats a multi-value selection for Prometheus), `$__rate_interval` and
    `$__interval` are durations."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", interval)
        .replace("$model", model)
    )


def save_linear_model(root: Path, name: str) -> Path:
    """A Dense model on (6, 5, 3) inputs, saved as root/name/1/model.keras."""
    import keras

    from tests.conftest import save_model

    keras.utils.set_random_seed(3)
    x = keras.Input((6, 5, 3), name="x")
    flat = keras.layers.Flatten(name="flatten")(x)
    return save_model(root, name, keras.Model(x, keras.layers.Dense(4, name="logits")(flat)))
