"""Settings come from flags over environment over defaults, validated at start-up."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from salience_server.settings import Settings, SettingsError


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.load(parser.parse_args(argv), environ=env)


def test_defaults() -> None:
    settings = parse([], {})
    assert settings.model_repository is None
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 8000)
    assert settings.max_message_bytes == 64 * 1024 * 1024


def test_flag_wins_over_environment_which_wins_over_default(tmp_path: Path) -> None:
    env = {
        "SALIENCE_PORT": "6000",
        "SALIENCE_MAX_BATCH_SIZE": "9",
        "SALIENCE_MODEL_REPOSITORY": str(tmp_path),
    }
    settings = parse(["--port", "7000", "--shutdown-grace-seconds", "2.5"], env)
    assert settings.port == 7000
    assert settings.max_batch_size == 9
    assert settings.shutdown_grace_seconds == 2.5
    assert settings.model_repository == tmp_path


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "70000"], {}, "port=70000 is out of range"),
        (["--port", "abc"], {}, "--port='abc' is not a valid int"),
        ([], {"SALIENCE_MAX_BATCH_SIZE": "0"}, "max_batch_size=0 must be at least 1"),
        ([], {"SALIENCE_WORKER_THREADS": "x"}, "SALIENCE_WORKER_THREADS='x' is not a valid int"),
        (["--model-repository", "/does/not/exist"], {}, "is not a directory"),
        (["--max-message-bytes", "1000"], {}, "max_message_bytes=1000 is too small"),
        (["--log-level", "LOUD"], {}, "log_level='LOUD' is not one of"),
        (["--metrics-port", "-2"], {}, "metrics_port=-2 is out of range"),
        (["--max-request-cost", "0"], {}, "max_request_cost=0 must be at least 1"),
        (
            ["--max-queue-cost", "100", "--max-request-cost", "200"],
            {},
            "max_queue_cost=100 is below max_request_cost=200: the costliest request would "
            "never fit in the queue",
        ),
        ([], {"SALIENCE_HEAVY_LANE_SHARE": "1"}, "heavy_lane_share=1.0 is out of range"),
    ],
)
def test_bad_values_stop_start_up_with_a_message(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv, env)


def test_readme_documents_every_setting() -> None:
    import dataclasses

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`--{f.name.replace('_', '-')}` (`SALIENCE_{f.name.upper()}`)" in readme, f.name
