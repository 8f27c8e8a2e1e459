"""Token files and the authentication decision, without a server: which metadata is
let in, what is refused with which message, and that no token is kept in clear.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from salience_server.security import (
    MALFORMED_TOKEN,
    MISSING_TOKEN,
    WRONG_TOKEN,
    TokenAuthInterceptor,
    load_token_digests,
)
from salience_server.settings import Settings, SettingsError

GOOD = "a1b2c3d4e5f6a7b8c9d0"
OTHER = "z" * 32


def interceptor(tmp_path: Path) -> TokenAuthInterceptor:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n  {GOOD}  \n\n{OTHER}\n{GOOD}\n")
    return TokenAuthInterceptor(load_token_digests(path))


def test_token_file_lines_become_digests_once_each(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n  {GOOD}  \n\n{OTHER}\n{GOOD}\n")
    digests = load_token_digests(path)
    assert digests == (
        hashlib.sha256(GOOD.encode()).digest(),
        hashlib.sha256(OTHER.encode()).digest(),
    )


@pytest.mark.parametrize(
    ("metadata", "refusal"),
    [
        ((), MISSING_TOKEN),
        (None, MISSING_TOKEN),
        ((("x-other", "1"),), MISSING_TOKEN),
        ((("authorization", f"Bearer {GOOD}"),), None),
        ((("authorization", f"bearer {OTHER}"),), None),  # the scheme is case-insensitive
        ((("authorization", f"Bearer  {GOOD} "),), None),
        ((("authorization", f"Bearer {GOOD}x"),), WRONG_TOKEN),
        ((("authorization", f"Bearer {GOOD[:-1]}"),), WRONG_TOKEN),
        ((("authorization", "Bearer tökén"),), WRONG_TOKEN),
        ((("authorization", f"Basic {GOOD}"),), MALFORMED_TOKEN),
        ((("authorization", "Bearer"),), MALFORMED_TOKEN),
        ((("authorization", GOOD),), MALFORMED_TOKEN),
    ],
)
def test_the_decision_for_each_kind_of_metadata(
    tmp_path: Path, metadata: Any, refusal: str | None
) -> None:
    assert interceptor(tmp_path).refusal(metadata) == refusal


def test_no_token_is_kept_in_clear(tmp_path: Path) -> None:
    guard = interceptor(tmp_path)
    kept = repr(vars(guard))
    assert GOOD not in kept
    assert OTHER not in kept


def test_an_interceptor_without_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="would refuse every call"):
        TokenAuthInterceptor(())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert_file": Path("c")}, "tls_cert_file is set without tls_key_file"),
        ({"tls_key_file": Path("k")}, "tls_key_file is set without tls_cert_file"),
        (
            {"tls_client_ca_file": Path("ca")},
            "tls_client_ca_file is set without tls_cert_file and tls_key_file",
        ),
        ({"max_connection_age_seconds": -1.0}, "max_connection_age_seconds=-1.0 is out of"),
    ],
)
def test_incomplete_security_settings_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**values)


def test_security_settings_from_flags_and_environment(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    flags = parser.parse_args(["--tls-cert-file", "/certs/tls.crt", "--tls-key-file", "/k"])
    env = {
        "SALIENCE_TLS_CLIENT_CA_FILE": "/certs/ca.crt",
        "SALIENCE_AUTH_TOKEN_FILE": str(tmp_path / "tokens"),
        "SALIENCE_MAX_CONNECTION_AGE_SECONDS": "300",
    }
    settings = Settings.load(flags, environ=env)
    assert settings.tls_cert_file == Path("/certs/tls.crt")
    assert settings.tls_key_file == Path("/k")
    assert settings.tls_client_ca_file == Path("/certs/ca.crt")
    assert settings.auth_token_file == tmp_path / "tokens"
    assert settings.max_connection_age_seconds == 300.0
    defaults = Settings()
    assert (defaults.tls_cert_file, defaults.auth_token_file) == (None, None)
    assert defaults.max_connection_age_seconds == 0.0
