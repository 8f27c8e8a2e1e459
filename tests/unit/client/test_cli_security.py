"""The command line's TLS and token options: what they build, and the usage errors
of bad ones — none of which ever prints the token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from salience_client.cli import main
from salience_client.cli.entry import parse_args
from salience_client.cli.options import UsageError, client_security

SECRET = "cli-secret-token-0123456789"


def test_no_options_mean_plaintext_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SALIENCE_TOKEN", raising=False)
    assert client_security(parse_args(["models"])) == {
        "tls": None,
        "token": None,
        "allow_plaintext_token": False,
    }


def test_tls_files_and_token_file_are_read(tmp_path: Path) -> None:
    for name in ("ca", "cert", "key"):
        (tmp_path / f"{name}.pem").write_bytes(f"{name} pem".encode())
    (tmp_path / "token").write_text(f"{SECRET}\n")
    args = parse_args(
        [
            "models",
            "--tls-ca", str(tmp_path / "ca.pem"),
            "--tls-cert", str(tmp_path / "cert.pem"),
            "--tls-key", str(tmp_path / "key.pem"),
            "--tls-server-name", "salience.internal",
            "--token-file", str(tmp_path / "token"),
        ]
    )  # fmt: skip
    found = client_security(args)
    tls = found["tls"]
    assert (tls.root_certificates, tls.certificate_chain, tls.private_key) == (
        b"ca pem",
        b"cert pem",
        b"key pem",
    )
    assert tls.server_name == "salience.internal"
    assert found["token"] == SECRET


def test_tls_alone_trusts_the_system_roots_and_the_token_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SALIENCE_TOKEN", f" {SECRET} ")
    found = client_security(parse_args(["models", "--tls"]))
    assert found["tls"].root_certificates is None
    assert found["token"] == SECRET


def test_a_certificate_without_its_key_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"x")
    with pytest.raises(UsageError, match="give both"):
        client_security(parse_args(["models", "--tls-cert", str(tmp_path / "cert.pem")]))


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty: write the token into it"), ("\n  \n", "is empty")],
)
def test_an_empty_token_file_is_a_usage_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "token").write_text(content)
    with pytest.raises(UsageError, match=message):
        client_security(parse_args(["models", "--token-file", str(tmp_path / "token")]))


def test_a_token_over_plaintext_to_another_machine_exits_2_without_printing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "token").write_text(SECRET)
    argv = ["models", "--target", "salience.example.com:50051", "--token-file"]
    assert main([*argv, str(tmp_path / "token")]) == 2
    err = capsys.readouterr().err
    assert "readable by anyone on the path" in err
    assert SECRET not in err


def test_bench_refuses_a_token_over_plaintext_to_another_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    argv = ["bench", "--target", "example.com:50051", "--model", "m", "--token-file", str(token)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "a token over plaintext would cross the network to example.com:50051" in err
    assert SECRET not in err
