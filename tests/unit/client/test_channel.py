"""The client's channel configuration: service config JSON, channel arguments,
deadlines, TLS options and where a token may be sent, checked value by value.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import grpc
import pytest

from salience_client import DEFAULT, TLS, Keepalive, RetryPolicy, SalienceClient, SalienceError
from salience_client.channel import (
    SERVER_MIN_PING_INTERVAL_SECONDS,
    ChannelConfig,
    is_local_target,
    resolve_timeout,
    target_hosts,
)


def options_of(config: ChannelConfig) -> dict[str, Any]:
    options = dict(config.options())
    assert len(options) == len(config.options()), "an option is given twice"
    return options


def test_default_service_config_retries_two_codes_with_backoff_and_balances_round_robin() -> None:
    config = ChannelConfig("localhost:50051")
    assert json.loads(options_of(config)["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "salience.v1.Salience"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2.0,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }


def test_default_channel_arguments() -> None:
    options = options_of(ChannelConfig("localhost:50051"))
    del options["grpc.service_config"]
    assert options == {
        "grpc.max_send_message_length": 64 * 1024 * 1024,
        "grpc.max_receive_message_length": 64 * 1024 * 1024,
        "grpc.service_config_disable_resolution": 1,
        "grpc.enable_retries": 1,
        "grpc.per_rpc_retry_buffer_size": 16 * 1024 * 1024,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }


def test_custom_policy_durations_are_protobuf_json_durations() -> None:
    policy = RetryPolicy(
        max_attempts=3, initial_backoff=0.25, max_backoff=1.5, backoff_multiplier=1.6
    )
    config = ChannelConfig("localhost:1", retry=policy, load_balancing="pick_first")
    service = json.loads(options_of(config)["grpc.service_config"])
    assert service["loadBalancingConfig"] == [{"pick_first": {}}]
    assert service["methodConfig"][0]["retryPolicy"] == {
        "maxAttempts": 3,
        "initialBackoff": "0.25s",
        "maxBackoff": "1.5s",
        "backoffMultiplier": 1.6,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    tiny = RetryPolicy(initial_backoff=1e-6, max_backoff=2e-6)
    assert tiny.method_config()["initialBackoff"] == "0.000001s"


def test_no_retries_turns_them_off_and_leaves_no_policy() -> None:
    options = options_of(ChannelConfig("localhost:1", retry=None, keepalive=None))
    assert options["grpc.enable_retries"] == 0
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    assert "grpc.per_rpc_retry_buffer_size" not in options
    assert not [k for k in options if "keepalive" in k or "ping" in k]


def test_extra_options_come_last_and_tls_name_override_is_an_option() -> None:
    config = ChannelConfig(
        "10.0.0.5:50051",
        tls=TLS(server_name="salience.internal"),
        extra_options=[("grpc.keepalive_time_ms", 60_000)],
    )
    options = config.options()
    assert ("grpc.ssl_target_name_override", "salience.internal") in options
    # Later entries win in gRPC, so a caller's own value overrides the default.
    assert [v for k, v in options if k == "grpc.keepalive_time_ms"] == [30_000, 60_000]


def test_the_client_keepalive_default_is_one_the_server_allows() -> None:
    from salience_server.app import MIN_CLIENT_PING_INTERVAL_MS

    assert SERVER_MIN_PING_INTERVAL_SECONDS * 1000 == MIN_CLIENT_PING_INTERVAL_MS
    assert Keepalive().time * 1000 >= MIN_CLIENT_PING_INTERVAL_MS
    with pytest.raises(ValueError, match=r"at least 10 seconds, the server's floor"):
        Keepalive(time=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 1}, "max_attempts=1 is not allowed: use 2 to 5"),
        ({"max_attempts": 6}, "max_attempts=6 is not allowed: use 2 to 5"),
        ({"initial_backoff": 0.0}, "initial_backoff=0.0 is not allowed"),
        ({"backoff_multiplier": math.inf}, "backoff_multiplier=inf is not allowed"),
        ({"initial_backoff": 3.0, "max_backoff": 2.0}, "max_backoff=2.0 is below"),
    ],
)
def test_bad_retry_policies_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_timeouts_default_none_and_explicit() -> None:
    assert resolve_timeout(DEFAULT, 60.0) == 60.0
    assert resolve_timeout(DEFAULT, None) is None  # a client without a default deadline
    assert resolve_timeout(None, 60.0) is None  # "no deadline" is not "the default"
    assert resolve_timeout(2, 60.0) == 2.0
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="positive number of seconds"):
            resolve_timeout(bad, 60.0)


def test_call_kwargs_carry_the_deadline_and_the_token() -> None:
    with SalienceClient("127.0.0.1:1", timeout=5.0, token="t" * 20) as client:
        bearer = (("authorization", "Bearer " + "t" * 20),)
        assert client._call_kwargs(DEFAULT) == {"timeout": 5.0, "metadata": bearer}
        assert client._call_kwargs(None) == {"timeout": None, "metadata": bearer}
        assert client._call_kwargs(0.5) == {"timeout": 0.5, "metadata": bearer}
        assert "t" * 20 not in repr(client)
    with SalienceClient("127.0.0.1:1", timeout=None) as client:
        assert client._call_kwargs(DEFAULT) == {"timeout": None, "metadata": None}


@pytest.mark.parametrize(
    ("target", "hosts", "local"),
    [
        ("localhost:50051", ["localhost"], True),
        ("127.0.0.1:50051", ["127.0.0.1"], True),
        ("127.0.0.2:7", ["127.0.0.2"], True),
        ("[::1]:50051", ["::1"], True),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", ["127.0.0.1", "127.0.0.1"], True),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", ["127.0.0.1", "10.0.0.1"], False),
        ("ipv6:[::1]:5", ["::1"], True),
        ("dns:///localhost:50051", ["localhost"], True),
        ("dns://8.8.8.8/localhost:50051", ["localhost"], True),
        ("dns:///salience-headless.ml.svc:50051", ["salience-headless.ml.svc"], False),
        ("unix:/run/salience.sock", [], True),
        ("salience.example.com:443", ["salience.example.com"], False),
        ("10.1.2.3:50051", ["10.1.2.3"], False),
        ("xds:///salience", None, False),
    ],
)
def test_local_targets(target: str, hosts: list[str] | None, local: bool) -> None:
    assert target_hosts(target) == hosts
    assert is_local_target(target) is local


def test_a_token_over_plaintext_goes_only_to_this_machine_unless_allowed() -> None:
    token = "s3cr3t-token-value-0123456789"
    with pytest.raises(ValueError, match="readable by anyone on the path") as caught:
        ChannelConfig("salience.example.com:50051", token=token)
    assert token not in str(caught.value)
    ChannelConfig("salience.example.com:50051", token=token, allow_plaintext_token=True)
    ChannelConfig("salience.example.com:50051", token=token, tls=TLS())
    ChannelConfig("localhost:50051", token=token)
    for bad in ("", "two words", "naïve-token-0123456789"):
        with pytest.raises(ValueError, match="printable ASCII without spaces"):
            ChannelConfig("localhost:50051", token=bad)


def test_tls_needs_key_and_certificate_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give both"):
        TLS(certificate_chain=b"cert")
    with pytest.raises(ValueError, match="cannot read the CA file"):
        TLS.from_files(ca=tmp_path / "missing.pem")
    (tmp_path / "ca.pem").write_bytes(b"ca")
    tls = TLS.from_files(ca=tmp_path / "ca.pem", server_name="x")
    assert (tls.root_certificates, tls.certificate_chain, tls.server_name) == (b"ca", None, "x")
    assert "ca" not in repr(tls).replace("TLS(", "")


def test_deadline_errors_name_the_deadline() -> None:
    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self) -> str:
            return "Deadline Exceeded"

    err = SalienceError.from_rpc_error(Failed(), 0.25)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.details == "no answer within the call's deadline of 0.25 s (Deadline Exceeded)"
    assert err.timeout == 0.25
    assert str(err).startswith("DEADLINE_EXCEEDED: no answer within")


def test_a_client_given_no_target_connects_to_salience_target_else_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from salience_client import AsyncSalienceClient, SalienceClient

    monkeypatch.delenv("SALIENCE_TARGET", raising=False)
    with SalienceClient() as client:
        assert (client.target, client.config.target) == ("localhost:50051", "localhost:50051")
    monkeypatch.setenv("SALIENCE_TARGET", "salience.internal:7000")
    with SalienceClient() as client:
        assert (client.target, client.config.target) == ("salience.internal:7000",) * 2
    with SalienceClient("elsewhere:1") as client:  # a target given wins
        assert client.target == "elsewhere:1"

    async def asynchronous() -> str:
        async with AsyncSalienceClient() as client:
            return client.target

    assert asyncio.run(asynchronous()) == "salience.internal:7000"
    monkeypatch.setenv("SALIENCE_TARGET", "")  # empty is unset
    with SalienceClient() as client:
        assert client.target == "localhost:50051"
