"""TLS, mutual TLS and bearer tokens on a real server, with certificates made for
the test (a CA, a server certificate for 127.0.0.1 and localhost, client
certificates from that CA and from another one), and start-up refusing every
misconfiguration with a message naming the setting.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from salience_client import TLS, AsyncSalienceClient, SalienceClient, SalienceError
from salience_client.client import predict_request
from salience_server.security import MALFORMED_TOKEN, MISSING_TOKEN, WRONG_TOKEN
from salience_server.settings import Settings, SettingsError
from tests.conftest import RunningServer, running_server, save_model

FEATURES = 4
UNITS = 2
TOKENS = ("first-token-0123456789abcdef", "second-token-fedcba9876543210")
WRONG = "wrong-token-00000000000000000"


# Certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: `ca` signed the server's and `client` certificates; `rogue` is a
    client certificate from another CA, `other_ca` that CA.
    """

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _write(path: Path, key: Any, cert: Any) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = path.with_suffix(".pem"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _certificate(subject: str, key: Any, issuer: Any | None, issuer_key: Any, *, usage: str) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if usage == "ca":
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        purpose = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if usage == "server"
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), False)
    if usage == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path) -> Pki:
    from cryptography.hazmat.primitives.asymmetric import ec

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_key = key(), key()
    ca = _certificate("salience test CA", ca_key, None, ca_key, usage="ca")
    other = _certificate("another CA", other_key, None, other_key, usage="ca")
    ca_path, _ = _write(root / "ca", ca_key, ca)
    other_path, _ = _write(root / "other-ca", other_key, other)
    server_key, client_key, rogue_key = key(), key(), key()
    server = _certificate("salience", server_key, ca, ca_key, usage="server")
    client = _certificate("backend", client_key, ca, ca_key, usage="client")
    rogue = _certificate("backend", rogue_key, other, other_key, usage="client")
    return Pki(
        ca_path,
        other_path,
        *_write(root / "server", server_key, server),
        *_write(root / "client", client_key, client),
        *_write(root / "rogue", rogue_key, rogue),
    )


# Fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    keras.utils.set_random_seed(17)
    x = keras.Input((FEATURES,), name="x")
    logits = keras.layers.Dense(UNITS, name="logits", bias_initializer="glorot_uniform")(x)
    return save_model(tmp_path_factory.mktemp("security-repo"), "linear", keras.Model(x, logits))


@pytest.fixture(scope="module")
def expected(repo: Path) -> Any:
    import keras

    model = keras.saving.load_model(repo / "linear" / "1" / "model.keras")
    kernel, bias = model.get_layer("logits").get_weights()
    return lambda x: x.astype(np.float64) @ kernel + bias


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# the backend's tokens, old and new\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    return path


@pytest.fixture(scope="module")
def tls_server(repo: Path, pki: Pki, token_file: Path) -> Iterator[RunningServer]:
    """TLS, and a bearer token on every call but health checks."""
    with running_server(
        repo,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        auth_token_file=token_file,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(repo: Path, pki: Pki) -> Iterator[RunningServer]:
    """Mutual TLS: a client certificate from `pki.ca` or no connection."""
    with running_server(
        repo,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
    ) as running:
        yield running


def x_batch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, FEATURES)).astype(np.float32)


def exposition(running: RunningServer) -> str:
    return generate_latest(running.server.metrics.registry).decode()


def requests_total(running: RunningServer, rpc: str, code: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition(running))
        for sample in family.samples
        if sample.name == "salience_requests_total"
        and (sample.labels["rpc"], sample.labels["code"]) == (rpc, code)
    )


def secure_channel(pki: Pki, *, cert: bool = True) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if cert else None,
        certificate_chain=pki.client_cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel("localhost:0", credentials)  # replaced by the callers


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def refused_code(client: SalienceClient) -> grpc.StatusCode:
    with client, pytest.raises(SalienceError) as caught:
        client.predict("linear", x_batch())
    return caught.value.code


# TLS and tokens -----------------------------------------------------------------


def test_the_right_token_over_tls_is_answered(
    tls_server: RunningServer, pki: Pki, expected: Any
) -> None:
    x = x_batch(1)
    for token in TOKENS:  # every line of the token file is a valid token
        with SalienceClient(tls_server.target, tls=TLS.from_files(ca=pki.ca), token=token) as c:
            np.testing.assert_allclose(c.predict("linear", x).predictions, expected(x), rtol=1e-5)
            assert [m.name for m in c.list_models()] == ["linear"]


def test_the_async_client_speaks_tls_with_a_token(
    tls_server: RunningServer, pki: Pki, expected: Any
) -> None:
    x = x_batch(2)

    async def call() -> Any:
        tls = TLS.from_files(ca=pki.ca)
        async with AsyncSalienceClient(tls_server.target, tls=tls, token=TOKENS[1]) as client:
            return await client.explain("linear", x, filter_indices=[1])

    result = asyncio.run(call())
    np.testing.assert_allclose(result.predictions, expected(x), rtol=1e-5)
    assert result.maps["absolute"].shape == x.shape


def test_a_plaintext_client_cannot_talk_to_a_tls_port(tls_server: RunningServer) -> None:
    client = SalienceClient(tls_server.target, retry=None, token=TOKENS[0])
    assert refused_code(client) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("roots", ["system", "other_ca"])
def test_a_client_that_does_not_trust_the_servers_ca_cannot_connect(
    tls_server: RunningServer, pki: Pki, roots: str
) -> None:
    tls = TLS() if roots == "system" else TLS.from_files(ca=pki.other_ca)
    client = SalienceClient(tls_server.target, tls=tls, token=TOKENS[0], retry=None)
    assert refused_code(client) == grpc.StatusCode.UNAVAILABLE


def test_the_certificate_must_name_the_host_dialled(tls_server: RunningServer, pki: Pki) -> None:
    # Dialled by a name the certificate does not carry: refused, unless told which
    # name to expect.
    wrong_name = TLS.from_files(ca=pki.ca, server_name="salience.example.com")
    client = SalienceClient(tls_server.target, tls=wrong_name, token=TOKENS[0], retry=None)
    assert refused_code(client) == grpc.StatusCode.UNAVAILABLE
    right_name = TLS.from_files(ca=pki.ca, server_name="localhost")
    with SalienceClient(tls_server.target, tls=right_name, token=TOKENS[0]) as client:
        assert client.predict("linear", x_batch()).model_version == 1


def test_missing_wrong_and_malformed_tokens_are_unauthenticated_and_leave_no_trace(
    tls_server: RunningServer,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    before = requests_total(tls_server, "Predict", "UNAUTHENTICATED")
    tls = TLS.from_files(ca=pki.ca)
    with SalienceClient(tls_server.target, tls=tls) as client:
        with pytest.raises(SalienceError) as missing:
            client.predict("linear", x_batch())
        with pytest.raises(SalienceError) as listing:
            client.list_models()
    with SalienceClient(tls_server.target, tls=tls, token=WRONG) as client:
        with pytest.raises(SalienceError) as wrong:
            client.predict("linear", x_batch())
        with pytest.raises(SalienceError) as explaining:
            client.explain("linear", x_batch())
    with SalienceClient(tls_server.target, tls=tls) as client:
        # Another scheme than Bearer, through the stub itself.
        stub_call = client._stub.Predict
        with pytest.raises(grpc.RpcError) as basic:
            stub_call(
                predict_request("linear", x_batch()),
                metadata=(("authorization", f"Basic {WRONG}"),),
                timeout=10,
            )
    for caught, message in (
        (missing, MISSING_TOKEN),
        (listing, MISSING_TOKEN),
        (wrong, WRONG_TOKEN),
        (explaining, WRONG_TOKEN),
    ):
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details == message
    assert basic.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert basic.value.details() == MALFORMED_TOKEN

    # Counted like any other call (and never retried: one attempt each).
    assert requests_total(tls_server, "Predict", "UNAUTHENTICATED") - before == 3
    assert requests_total(tls_server, "Explain", "UNAUTHENTICATED") >= 1
    assert requests_total(tls_server, "ListModels", "UNAUTHENTICATED") >= 1
    # The refusals are logged with the reason, and no token appears anywhere.
    captured = capfd.readouterr()
    refusals = [r.getMessage() for r in caplog.records if r.name == "salience_server.security"]
    assert any(WRONG_TOKEN in m and "/salience.v1.Salience/Predict" in m for m in refusals)
    assert any(MISSING_TOKEN in m for m in refusals)
    for secret in (WRONG, *TOKENS):
        assert secret not in caplog.text
        assert secret not in captured.out + captured.err
        assert secret not in exposition(tls_server)
        assert secret not in str(wrong.value)


def test_health_needs_no_token_and_reflection_does(tls_server: RunningServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel, "linear") == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details() == MISSING_TOKEN
        answers = stub.ServerReflectionInfo(
            iter([request]), timeout=10, metadata=(("authorization", f"Bearer {TOKENS[0]}"),)
        )
        names = {s.name for s in next(iter(answers)).list_services_response.service}
    assert {"salience.v1.Salience", "grpc.health.v1.Health"} <= names


def test_the_command_line_connects_with_tls_and_a_token_file(
    tls_server: RunningServer,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from salience_client.cli import main

    monkeypatch.delenv("SALIENCE_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text(TOKENS[0] + "\n")
    argv = ["models", "--target", tls_server.target, "--tls-ca", str(pki.ca), "--json"]
    assert main([*argv, "--token-file", str(token)]) == 0
    assert '"name": "linear"' in capsys.readouterr().out
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: UNAUTHENTICATED: {MISSING_TOKEN}\n")
    assert "hint: the server asks for a bearer token: pass --token-file FILE" in err


def test_the_load_generator_speaks_tls_with_a_token(
    tls_server: RunningServer,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from salience_client.cli import main

    monkeypatch.delenv("SALIENCE_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text(TOKENS[1] + "\n")
    argv = ["bench", "--target", tls_server.target, "--tls-ca", str(pki.ca), "--model", "linear"]
    argv += ["--rpc", "predict", "--requests", "12", "--warmup", "0", "--json"]
    assert main([*argv, "--token-file", str(token)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["requests"], figures["ok"], figures["errors"]) == (12, 12, {})
    # Without the token the metadata call is refused before any load is sent.
    assert main(argv) == 1
    assert f"UNAUTHENTICATED: {MISSING_TOKEN}" in capsys.readouterr().err


# Mutual TLS ---------------------------------------------------------------------


def test_mutual_tls_admits_only_certificates_from_its_ca(
    mtls_server: RunningServer, pki: Pki, expected: Any
) -> None:
    target = mtls_server.target
    without = SalienceClient(target, tls=TLS.from_files(ca=pki.ca), retry=None)
    assert refused_code(without) == grpc.StatusCode.UNAVAILABLE
    rogue = TLS.from_files(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)
    assert refused_code(SalienceClient(target, tls=rogue, retry=None)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    plaintext = SalienceClient(target, retry=None)
    assert refused_code(plaintext) == grpc.StatusCode.UNAVAILABLE

    mutual = TLS.from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    x = x_batch(3)
    with SalienceClient(target, tls=mutual) as client:
        np.testing.assert_allclose(client.predict("linear", x).predictions, expected(x), rtol=1e-5)


def test_under_mutual_tls_even_health_needs_a_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(mtls_server.target, anonymous) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            health_status(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    identified = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    with grpc.secure_channel(mtls_server.target, identified) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


# Misconfiguration ---------------------------------------------------------------


def start_fails(**settings: Any) -> str:
    """The SettingsError message of a server started with these settings."""
    from salience_server.app import SalienceServer

    server = SalienceServer(Settings(host="127.0.0.1", port=0, metrics_port=-1, **settings))
    with pytest.raises(SettingsError) as caught:
        asyncio.run(server.start())
    return str(caught.value)


def test_unusable_tls_files_stop_start_up_naming_the_setting(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    message = start_fails(tls_cert_file=missing, tls_key_file=pki.server_key)
    assert message == f"tls_cert_file={str(missing)!r} cannot be read: No such file or directory"
    message = start_fails(tls_cert_file=pki.server_cert, tls_key_file=pki.server_cert)
    assert message == (
        f"tls_key_file={str(pki.server_cert)!r} holds no PEM private key "
        "(-----BEGIN PRIVATE KEY-----)"
    )
    message = start_fails(tls_cert_file=pki.server_key, tls_key_file=pki.server_key)
    assert message.startswith(f"tls_cert_file={str(pki.server_key)!r} holds no PEM certificate")
    message = start_fails(tls_cert_file=pki.server_cert, tls_key_file=pki.client_key)
    assert message == (
        f"tls_key_file={str(pki.client_key)!r} is not the private key of "
        f"tls_cert_file={str(pki.server_cert)!r}, or one of them is not valid PEM"
    )
    message = start_fails(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=tmp_path
    )
    assert message == f"tls_client_ca_file={str(tmp_path)!r} cannot be read: Is a directory"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no token: write one per line"),
        ("# only a comment\n\n", "holds no token: write one per line"),
        (f"{TOKENS[0]}\nshort-secret\n", "line 2 is shorter than 16 characters"),
        (f"{TOKENS[0]} and words\n", "line 1 is not a token: use printable ASCII"),
        ("tökén-0123456789abcdef\n", "is not ASCII"),
    ],
)
def test_unusable_token_files_stop_start_up_naming_the_setting(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    got = start_fails(auth_token_file=path)
    assert got.startswith(f"auth_token_file={str(path)!r} ")
    assert message in got
    for line in content.splitlines():  # a message never repeats what the file holds
        if line.strip() and not line.startswith("#"):
            assert line.strip() not in got


def test_unreadable_token_file_stops_start_up(tmp_path: Path) -> None:
    got = start_fails(auth_token_file=tmp_path / "absent")
    assert got == f"auth_token_file={str(tmp_path / 'absent')!r} cannot be read: " + (
        "No such file or directory"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert-file", "c.pem"], "tls_cert_file is set without tls_key_file"),
        (["--tls-key-file", "k.pem"], "tls_key_file is set without tls_cert_file"),
        (["--tls-client-ca-file", "ca.pem"], "tls_client_ca_file is set without tls_cert_file"),
        (["--max-connection-age-seconds", "-1"], "max_connection_age_seconds=-1.0 is out of"),
    ],
)
def test_incomplete_tls_settings_are_usage_errors_of_salience_serve(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from salience_client.cli import main
    from salience_client.cli.options import EXIT_USAGE

    assert main(["serve", *flags]) == EXIT_USAGE
    assert message in capsys.readouterr().err
