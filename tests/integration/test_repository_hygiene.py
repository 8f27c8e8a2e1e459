"""The model repository as an attacker (or a careless operator) could leave it,
against a real server: a FIFO among the models' files, model and version
directories and a config.toml that are links leading outside the repository, and
load failures whose reasons would tell clients where the server keeps its files.

Each test reproduced its finding before the fix: the FIFO hung hot reload for ever
(new models never loaded) and then SIGTERM was ignored; the links were followed,
and an outside TOML's first key was echoed to clients; reasons held absolute paths.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError
from tests.conftest import running_server
from tests.integration.models import LINEAR_SHAPE, build_repository
from tests.processes import salience_serve

X = np.random.default_rng(0).uniform(size=(1, *LINEAR_SHAPE)).astype(np.float32)
WAIT_S = 90.0  # the longest a change may take to show: only stops a hung test
SECRET_KEY = "database_password_of_another_service"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved models (`linear`, `softmax`, `smooth`) to copy or link from."""
    return build_repository(tmp_path_factory.mktemp("hygiene-models"))


def wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def served(client: SalienceClient) -> set[str]:
    return {m.name for m in client.list_models() if m.versions}


# Finding 3: a FIFO in the repository -------------------------------------------------


def test_a_fifo_in_the_repository_is_skipped_reload_goes_on_and_sigterm_exits(
    tmp_path: Path, models: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(models / "linear", repo / "linear")
    with salience_serve(repo, ["--repository-poll-seconds", "0.2"]) as server:
        # FIFOs where each kind of file is read: beside config.toml (whose
        # neighbours are hashed on every poll), inside a version, and as config.toml.
        os.mkfifo(repo / "linear" / "notes.txt")
        os.mkfifo(repo / "linear" / "1" / "pipe")
        (repo / "piped").mkdir()
        shutil.copytree(models / "softmax" / "1", repo / "piped" / "1")
        os.mkfifo(repo / "piped" / "config.toml")
        # A model added after them still loads: the poll was not stuck on a FIFO.
        shutil.copytree(models / "smooth", tmp_path / "smooth")
        (tmp_path / "smooth").rename(repo / "smooth")
        with SalienceClient(server.target, timeout=30) as client:
            wait_for("the new model to be served", lambda: "smooth" in served(client))
            assert served(client) == {"linear", "smooth"}
            (piped,) = [m for m in client.list_models() if m.name == "piped"]
            assert [s.reason for s in piped.version_status] == [
                "config.toml is a FIFO: it is not read"
            ]
            out = client.predict("linear", X).outputs
            assert list(out) == ["logits"]
        text = server.text()
        assert f"skipping {repo / 'linear' / 'notes.txt'}: a FIFO" in text
        # Warned once, not on every poll.
        assert text.count(f"skipping {repo / 'linear' / 'notes.txt'}") == 1
        # SIGTERM ends it (before the fix, a reload thread blocked on the FIFO held
        # the process for ever).
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail("salience serve ignored SIGTERM:\n" + server.text())
        assert code == 0, server.text()


# Finding 10: links leading outside the repository -------------------------------------


def outside_layout(tmp_path: Path, models: Path) -> Path:
    """A repository whose `inside` model is real, `linked` is a link to a model
    directory outside, `versioned` has a version directory linked outside, and
    `configured` a config.toml linked to an outside TOML file holding a secret.
    """
    outside = tmp_path / "outside"
    shutil.copytree(models, outside)
    (outside / "secrets.toml").write_text(f'{SECRET_KEY} = "hunter2"\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(models / "linear", repo / "inside")
    (repo / "linked").symlink_to(outside / "softmax", target_is_directory=True)
    (repo / "versioned").mkdir()
    (repo / "versioned" / "1").symlink_to(outside / "linear" / "1", target_is_directory=True)
    shutil.copytree(models / "linear", repo / "configured")
    (repo / "configured" / "config.toml").symlink_to(outside / "secrets.toml")
    # A link inside the repository (as a mounted ConfigMap's ..data) is followed.
    shutil.copytree(models / "smooth", repo / ".store-smooth")
    (repo / "aliased").symlink_to(repo / ".store-smooth", target_is_directory=True)
    return repo


def test_links_leading_outside_the_repository_are_refused(tmp_path: Path, models: Path) -> None:
    repo = outside_layout(tmp_path, models)
    with running_server(repo) as running, running.client(timeout=30) as client:
        listed = {m.name: m for m in client.list_models()}
        assert served(client) == {"inside", "aliased"}
        assert "linked" not in listed
        configured = listed["configured"]
        reasons = [s.reason for s in configured.version_status]
        assert reasons == [
            "config.toml is a link leading outside the model repository (set "
            "allow_links_outside_repository to follow it): it is not read"
        ]
        with pytest.raises(SalienceError) as caught:
            client.predict("configured", X)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert SECRET_KEY not in caught.value.details
        with pytest.raises(SalienceError) as caught:
            client.predict("linked", X)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert client.predict("aliased", np.zeros((1, 7, 6, 2))).outputs


def test_a_setting_allows_links_outside(tmp_path: Path, models: Path) -> None:
    repo = outside_layout(tmp_path, models)
    with (
        running_server(repo, allow_links_outside_repository=True) as running,
        running.client(timeout=30) as client,
    ):
        assert served(client) == {"inside", "aliased", "linked", "versioned"}
        # The outside TOML is read, as the operator asked: its key is refused as unknown.
        (configured,) = [m for m in client.list_models() if m.name == "configured"]
        assert SECRET_KEY in configured.version_status[0].reason


# Finding 11: reasons name paths relative to the repository ---------------------------


def test_load_failure_reasons_name_paths_relative_to_the_repository(
    tmp_path: Path, models: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(models / "linear", repo / "linear")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.keras").write_bytes(b"not a zip archive")
    (repo / "empty" / "1").mkdir(parents=True)
    (repo / "empty" / "1" / "weights.bin").write_bytes(b"")
    (repo / "none").mkdir()
    with running_server(repo) as running, running.client(timeout=30) as client:
        reasons = {
            m.name: [s.reason for s in m.version_status]
            for m in client.list_models()
            if m.name != "linear"
        }
        messages = []
        for name in ("broken", "empty", "none"):
            with pytest.raises(SalienceError) as caught:
                client.predict(name, X)
            messages.append(caught.value.details)
    everything = " ".join([*messages, *(r for rs in reasons.values() for r in rs)])
    assert str(repo) not in everything
    assert str(repo.resolve()) not in everything
    assert "broken/1/model.keras" in reasons["broken"][0]
    assert reasons["empty"] == [
        "empty/1 holds no model: expected one of 'model.keras', 'model.h5', "
        "'saved_model.pb', found 'weights.bin'"
    ]
    assert reasons["none"] == [
        "no version to serve: none holds no version directory (a positive integer, such as 1/)"
    ]
