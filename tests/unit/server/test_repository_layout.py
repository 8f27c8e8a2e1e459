"""The repository layout: which directories are models and versions, which versions a
policy loads, what a failure does to the rest, and which model names are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from salience_server.errors import InvalidArgument, NotFound
from salience_server.model_config import ModelConfig
from salience_server.repository import (
    MODEL_NAME_PATTERN,
    ModelLoadError,
    ModelRepository,
    RepositoryError,
    model_format,
    scan,
)
from salience_server.runtime import ModelRuntime


@pytest.fixture(scope="module")
def tiny() -> Any:
    import keras

    x = keras.Input((3,), name="x")
    return keras.Model(x, keras.layers.Dense(2, name="out")(x))


def touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class FakeLoader:
    """Records what the repository asks to load; fails where told to."""

    def __init__(self, model: Any, broken: set[tuple[str, int]] | None = None) -> None:
        self.model = model
        self.broken = broken or set()
        self.calls: list[tuple[str, int, Path]] = []

    def __call__(self, name: str, version: int, path: Path, config: ModelConfig) -> ModelRuntime:
        self.calls.append((name, version, path))
        if (name, version) in self.broken:
            raise ModelLoadError(f"{path} is broken")
        return ModelRuntime(name, version, self.model, path, config)


def test_scan_skips_bad_names_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for path in ["good/1", "good/2", "good/latest", "good/01", "good/-3", "bad name/1",
                 "..hidden/1", "über/1", "x" * 129 + "/1", "ok.v2_b-c/7"]:  # fmt: skip
        (tmp_path / path).mkdir(parents=True)
    touch(tmp_path / "notadir.txt")
    with caplog.at_level(logging.WARNING, logger="salience_server.repository"):
        sources = scan(tmp_path)
    assert sorted(sources) == ["good", "ok.v2_b-c"]
    assert sorted(sources["good"].versions) == [1, 2]
    assert sources["good"].selected == (2,)  # latest 1 by default
    assert sources["ok.v2_b-c"].selected == (7,)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for skipped in ["good/latest", "good/01", "good/-3", "bad name", "über", "x" * 129]:
        assert f"{tmp_path / skipped}: " in warned
    assert f"a model name must match {MODEL_NAME_PATTERN}" in warned
    assert "a version directory is named by a positive integer" in warned
    # A hidden directory is expected clutter, not worth a warning.
    assert "..hidden" not in warned


def test_a_version_holds_exactly_one_model_format(tmp_path: Path) -> None:
    touch(tmp_path / "1" / "model.keras")
    assert model_format(tmp_path / "1") == tmp_path / "1" / "model.keras"
    touch(tmp_path / "2" / "saved_model.pb")
    touch(tmp_path / "2" / "variables" / "variables.index")
    assert model_format(tmp_path / "2") == tmp_path / "2" / "saved_model.pb"
    touch(tmp_path / "3" / "model.keras")
    touch(tmp_path / "3" / "model.h5")
    with pytest.raises(ModelLoadError) as both:
        model_format(tmp_path / "3")
    assert str(both.value) == (
        f"{tmp_path / '3'} holds 'model.keras', 'model.h5': keep exactly one model format per "
        "version directory"
    )
    touch(tmp_path / "4" / "weights.bin")
    touch(tmp_path / "4" / "notes.md")
    with pytest.raises(ModelLoadError) as none:
        model_format(tmp_path / "4")
    assert str(none.value) == (
        f"{tmp_path / '4'} holds no model: expected one of 'model.keras', 'model.h5', "
        "'saved_model.pb', found 'notes.md', 'weights.bin'"
    )


@pytest.mark.parametrize(
    ("config", "served"),
    [
        ("", [5]),
        ('version_policy = "all"', [1, 2, 5]),
        ("[version_policy]\ncount = 2", [2, 5]),
        ('[version_policy]\npolicy = "specific"\nversions = [1, 2, 9]', [1, 2]),
    ],
)
def test_the_version_policy_loads_exactly_its_versions(
    tmp_path: Path, tiny: Any, config: str, served: list[int]
) -> None:
    for version in (1, 2, 5):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
    touch(tmp_path / "m" / "config.toml", config)
    loader = FakeLoader(tiny)
    repository = ModelRepository.load(tmp_path, loader=loader, warm_up=False)
    assert [version for _, version, _ in loader.calls] == served
    assert [path for _, _, path in loader.calls] == [tmp_path / "m" / str(v) for v in served]
    assert repository.versions("m") == served
    assert repository.get("m").version == served[-1]
    assert repository.failures == ()


def test_failures_are_recorded_and_the_rest_is_served(tmp_path: Path, tiny: Any) -> None:
    for path in ["good/1", "badconfig/1", "broken/1", "broken/2", "empty"]:
        (tmp_path / path).mkdir(parents=True)
    touch(tmp_path / "badconfig" / "config.toml", "[batching]\nmax_queue_size = -1\n")
    touch(tmp_path / "broken" / "config.toml", 'version_policy = "all"\n')
    loader = FakeLoader(tiny, broken={("broken", 2)})
    repository = ModelRepository.load(tmp_path, loader=loader, warm_up=False)
    assert repository.names() == ["broken", "good"]
    assert repository.versions("broken") == [1]
    reasons = {(f.model, f.version): f.reason for f in repository.failures}
    assert reasons == {
        ("badconfig", None): "config.toml: batching.max_queue_size=-1 is not allowed: use an "
        "integer of at least 1",
        # Paths relative to the repository: the reasons are sent to clients.
        ("broken", 2): "broken/2 is broken",
        ("empty", None): "no version to serve: empty holds no version directory "
        "(a positive integer, such as 1/)",
    }
    # The model with a bad config is never loaded at all.
    assert [name for name, _, _ in loader.calls] == ["broken", "broken", "good"]
    with pytest.raises(NotFound) as missing:
        repository.get("badconfig")
    assert str(missing.value) == (
        "model.name='badconfig' is not served (it failed to load: config.toml: "
        "batching.max_queue_size=-1 is not allowed: use an integer of at least 1): choose one "
        "of 'broken', 'good'"
    )
    with pytest.raises(NotFound) as broken:
        repository.get("broken", 2)
    assert str(broken.value) == (
        "model.version=2 of model 'broken' is not served (it failed to load: "
        "broken/2 is broken): choose one of 1 (or 0 for the highest)"
    )


def test_nothing_loadable_is_an_error_naming_every_failure(tmp_path: Path, tiny: Any) -> None:
    (tmp_path / "a" / "1").mkdir(parents=True)
    touch(tmp_path / "b" / "config.toml", "colour = 'red'\n")
    with pytest.raises(RepositoryError) as failed:
        ModelRepository.load(tmp_path, loader=FakeLoader(tiny, {("a", 1)}), warm_up=False)
    assert str(failed.value) == (
        f"no model under {tmp_path} could be loaded: a version 1: a/1 is "
        "broken; b: config.toml: colour is not a key of the top level: use 'version_policy', "
        "'labels', 'labels_file', 'labels_output', 'batching', 'explain', 'limits', 'preprocess', "
        "'inputs'"
    )
    with pytest.raises(RepositoryError, match="no model found under"):
        ModelRepository.load(tmp_path / "a" / "1", loader=FakeLoader(tiny), warm_up=False)


@pytest.mark.parametrize(
    "name",
    ["../m", "..", ".", "m/1", "/etc/passwd", "m\\x", "m\x00", "m\n", "", " m", "mé", "-m",
     ".m", "m" * 129, "m:1"],
)  # fmt: skip
def test_request_names_that_could_leave_the_repository_are_refused(
    tmp_path: Path, tiny: Any, name: str
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    repository = ModelRepository.load(tmp_path, loader=FakeLoader(tiny), warm_up=False)
    with pytest.raises(InvalidArgument) as refused:
        repository.get(name)
    assert str(refused.value) == (
        f"model.name={name!r} is not a valid model name: use 1 to 128 letters, digits, '.', "
        f"'_' or '-', starting with a letter or digit ({MODEL_NAME_PATTERN})"
    )


def test_versions_must_not_be_negative(tmp_path: Path, tiny: Any) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    repository = ModelRepository.load(tmp_path, loader=FakeLoader(tiny), warm_up=False)
    assert repository.get("m", 1).version == 1
    with pytest.raises(InvalidArgument, match=r"^model.version=-1 is not allowed"):
        repository.get("m", -1)
    with pytest.raises(NotFound, match=r"^model.version=3 of model 'm' is not served: choose"):
        repository.get("m", 3)
