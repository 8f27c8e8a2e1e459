"""The /metrics endpoint secured like the gRPC port, against a real server: its own
bind address, HTTPS (and mutual TLS) and bearer tokens, scraped with and without
them. Before these settings it was plain HTTP on the gRPC port's address, open to
anyone who could reach it, and it shows model names, versions and traffic.
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from salience_server.settings import Settings, SettingsError
from tests.conftest import RunningServer, running_server
from tests.integration.models import LINEAR_SHAPE, build_repository
from tests.integration.test_security import Pki, make_pki

TOKEN = "metrics-scraper-token-0123456789abcdef"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("metrics-endpoint-repo"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("metrics-pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics-tokens") / "tokens"
    path.write_text(f"# Prometheus\n{TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def secured(repo: Path, pki: Pki, token_file: Path) -> Iterator[RunningServer]:
    with running_server(
        repo,
        metrics_port=0,
        metrics_host="127.0.0.1",
        metrics_tls_cert_file=pki.server_cert,
        metrics_tls_key_file=pki.server_key,
        metrics_auth_token_file=token_file,
    ) as running:
        yield running


def scrape(
    port: int, *, scheme: str = "https", token: str | None = None, ca: Path | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_https_with_the_token_is_answered(secured: RunningServer, pki: Pki) -> None:
    assert secured.server.metrics_port is not None
    with secured.client() as client:
        client.predict("linear", np.zeros((1, *LINEAR_SHAPE), np.float32))
    status, text = scrape(secured.server.metrics_port, token=TOKEN, ca=pki.ca)
    assert status == 200
    counted = 'salience_requests_total{code="OK",method="predict",model="linear",rpc="Predict"}'
    assert counted in text


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "this endpoint requires a bearer token: send `Authorization: Bearer <token>`\n"),
        ("wrong-token-0123456789abcdef", "the bearer token is not valid for this endpoint\n"),
    ],
)
def test_a_scrape_without_the_right_token_is_401_and_shows_nothing(
    secured: RunningServer, pki: Pki, token: str | None, message: str
) -> None:
    assert secured.server.metrics_port is not None
    status, text = scrape(secured.server.metrics_port, token=token, ca=pki.ca)
    assert (status, text) == (401, message)


def test_plain_http_gets_no_metrics_from_an_https_endpoint(secured: RunningServer) -> None:
    assert secured.server.metrics_port is not None
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        scrape(secured.server.metrics_port, scheme="http", token=TOKEN)


def test_a_silent_connection_does_not_hold_the_endpoint(secured: RunningServer, pki: Pki) -> None:
    """The TLS handshake runs per connection: one that never starts it blocks nobody."""
    assert secured.server.metrics_port is not None
    silent = [
        socket.create_connection(("127.0.0.1", secured.server.metrics_port)) for _ in range(8)
    ]
    try:
        status, _ = scrape(secured.server.metrics_port, token=TOKEN, ca=pki.ca)
        assert status == 200
    finally:
        for sock in silent:
            sock.close()


def test_mutual_tls_needs_a_client_certificate(repo: Path, pki: Pki) -> None:
    with running_server(
        repo,
        metrics_port=0,
        metrics_tls_cert_file=pki.server_cert,
        metrics_tls_key_file=pki.server_key,
        metrics_tls_client_ca_file=pki.ca,
    ) as running:
        port = running.server.metrics_port
        assert port is not None
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            scrape(port, ca=pki.ca)
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.client_cert, pki.client_key)
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/metrics", timeout=30, context=context
        ) as answer:
            assert answer.status == 200
            assert "salience_model_versions" in answer.read().decode()


def test_the_default_is_plain_http_on_the_grpc_address(repo: Path) -> None:
    with running_server(repo, metrics_port=0) as running:
        port = running.server.metrics_port
        assert port is not None
        status, text = scrape(port, scheme="http")
        assert status == 200
        assert "salience_model_versions" in text


def test_metrics_tls_half_configured_stops_start_up(pki: Pki) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(metrics_tls_cert_file=pki.server_cert)
    assert str(caught.value) == (
        "metrics_tls_cert_file is set without metrics_tls_key_file: TLS needs both the "
        "certificate and its private key"
    )
