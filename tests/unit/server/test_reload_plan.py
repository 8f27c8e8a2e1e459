"""Hot reload's decisions, without a server: what a poll sees as a change, when a
change has settled, and which versions a model loads, keeps and unloads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from salience_server.model_config import ModelConfig, VersionPolicy
from salience_server.reload import ChangeTracker, Plan, plan
from salience_server.repository import (
    FAILED,
    READY,
    Key,
    ModelFiles,
    ModelLoadError,
    ModelRepository,
    Stamp,
    VersionStatus,
    snapshot,
)
from salience_server.runtime import ModelRuntime

LATEST_1 = VersionPolicy()
LATEST_2 = VersionPolicy(count=2)
ALL = VersionPolicy(policy="all")

CONFIG: Stamp = (("config.toml", 10, "aa"),)
OTHER_CONFIG: Stamp = (("config.toml", 10, "bb"),)


def stamp(tag: str) -> Stamp:
    return (("model.keras", 100, tag),)


def files(versions: dict[int, str], config: Stamp = CONFIG) -> ModelFiles:
    return ModelFiles("m", Path("/repo/m"), config, {v: stamp(t) for v, t in versions.items()})


def key(tag: str, config: Stamp = CONFIG) -> Key:
    return (config, stamp(tag))


def test_nothing_changed_plans_nothing() -> None:
    step = plan(LATEST_1, files({1: "a", 2: "b"}), {2: key("b")}, {})
    assert step == Plan(serve=(2,), load=(), keep=(2,), unload=())
    assert not step.changes


def test_a_new_version_replaces_the_latest_and_the_old_one_unloads() -> None:
    step = plan(LATEST_1, files({1: "a", 2: "b"}), {1: key("a")}, {})
    assert step == Plan(serve=(2,), load=(2,), keep=(), unload=(1,))
    # With room for two, the old one stays.
    step = plan(LATEST_2, files({1: "a", 2: "b"}), {1: key("a")}, {})
    assert step == Plan(serve=(1, 2), load=(2,), keep=(1,), unload=())


def test_deleting_the_latest_loads_the_one_below_again() -> None:
    step = plan(LATEST_1, files({1: "a"}), {2: key("b")}, {})
    assert step == Plan(serve=(1,), load=(1,), keep=(), unload=(2,))
    step = plan(ALL, files({1: "a"}), {1: key("a"), 2: key("b")}, {})
    assert step == Plan(serve=(1,), load=(), keep=(1,), unload=(2,))


def test_a_broken_version_gives_way_to_the_next_one_down() -> None:
    on_disk = files({1: "a", 2: "b", 3: "junk"})
    # First try: the policy picks 3 ...
    assert plan(LATEST_1, on_disk, {2: key("b")}, {}).load == (3,)
    # ... it fails; the plan made again without it keeps 2 and changes nothing.
    step = plan(LATEST_1, on_disk, {2: key("b")}, {3: key("junk")})
    assert step == Plan(serve=(2,), load=(), keep=(2,), unload=())
    # Files that change are tried again.
    assert plan(LATEST_1, files({2: "b", 3: "fixed"}), {2: key("b")}, {3: key("junk")}).load == (3,)
    # With nothing served and every version broken, nothing is served.
    assert plan(LATEST_1, files({1: "x"}), {}, {1: key("x")}).serve == ()


def test_a_served_version_rewritten_with_broken_files_keeps_serving() -> None:
    step = plan(LATEST_1, files({2: "junk"}), {2: key("b")}, {2: key("junk")})
    assert step == Plan(serve=(2,), load=(), keep=(2,), unload=())


def test_a_changed_configuration_reloads_every_version() -> None:
    served = {1: key("a"), 2: key("b")}
    step = plan(ALL, files({1: "a", 2: "b"}, OTHER_CONFIG), served, {})
    assert step == Plan(serve=(1, 2), load=(1, 2), keep=(), unload=(1, 2))
    # A version that fails under the new configuration keeps its earlier runtime.
    failed = {2: key("b", OTHER_CONFIG)}
    step = plan(ALL, files({1: "a", 2: "b"}, OTHER_CONFIG), served, failed)
    assert step == Plan(serve=(1, 2), load=(1,), keep=(2,), unload=(1,))
    # A configuration failure (version None) does not count as a version's.
    assert plan(LATEST_1, files({2: "b"}), {2: key("b")}, {None: (CONFIG, ())}).load == ()


def test_changes_are_acted_on_once_they_hold_still_for_a_poll() -> None:
    tracker = ChangeTracker()
    first = {"m": files({1: "a"})}
    assert tracker.update(first) == []  # the first poll only records
    assert tracker.update(first) == ["m"]  # then every model is checked once
    assert tracker.update(first) == []
    copying = {"m": files({1: "a", 2: "half"})}
    assert tracker.update(copying) == []
    copied = {"m": files({1: "a", 2: "whole"})}
    assert tracker.update(copied) == []  # still changing
    assert tracker.update(copied) == ["m"]
    # A model removed, and one added, settle the same way.
    moved = {"n": files({1: "a"})}
    assert tracker.update(moved) == []
    assert tracker.update(moved) == ["m", "n"]
    assert tracker.update(moved) == []


def test_snapshot_stamps_what_a_reload_depends_on(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    (version / "variables").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"graph")
    (version / "variables" / "variables.index").write_bytes(b"index")
    (tmp_path / "m" / "config.toml").write_text('version_policy = "all"\n')
    (tmp_path / "m" / ".config.toml.swp").write_text("editor clutter")
    (tmp_path / "bad name").mkdir()
    before = snapshot(tmp_path)
    assert list(before) == ["m"]
    assert [entry[:2] for entry in before["m"].versions[1]] == [
        ("saved_model.pb", 5),
        ("variables/variables.index", 5),
    ]
    assert [entry[0] for entry in before["m"].config] == ["config.toml"]
    assert snapshot(tmp_path) == before

    # The configuration is stamped by content: a rewrite of equal size and mtime shows.
    status = (tmp_path / "m" / "config.toml").stat()
    (tmp_path / "m" / "config.toml").write_text('version_policy = "any"\n')
    os.utime(tmp_path / "m" / "config.toml", ns=(status.st_atime_ns, status.st_mtime_ns))
    changed = snapshot(tmp_path)
    assert changed["m"].config != before["m"].config
    assert changed["m"].versions == before["m"].versions

    # A version's files by size, mtime and inode: a file replaced by another one is seen.
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"GRAPH")
    status = (version / "saved_model.pb").stat()
    os.utime(replacement, ns=(status.st_atime_ns, status.st_mtime_ns))
    replacement.rename(version / "saved_model.pb")
    assert snapshot(tmp_path)["m"].versions != changed["m"].versions


@pytest.fixture(scope="module")
def tiny() -> Any:
    import keras

    x = keras.Input((3,), name="x")
    return keras.Model(x, keras.layers.Dense(2, name="out")(x))


def test_at_start_up_too_a_broken_latest_version_gives_way(tmp_path: Path, tiny: Any) -> None:
    for version in (1, 2, 3):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
    calls = []

    def loader(name: str, version: int, path: Path, config: ModelConfig) -> ModelRuntime:
        calls.append(version)
        if version == 3:
            raise ModelLoadError(f"{path} is broken")
        return ModelRuntime(name, version, tiny, path, config)

    repository = ModelRepository.load(tmp_path, loader=loader, warm_up=False)
    assert calls == [3, 2]
    assert repository.versions("m") == [2]
    assert repository.statuses("m") == [
        VersionStatus(2, READY),
        VersionStatus(3, FAILED, "m/3 is broken"),  # relative to the repository
    ]
    # What the watcher compares with: the stamps the versions were loaded from.
    files = snapshot(tmp_path)["m"]
    assert repository.loaded_keys("m") == {2: files.key(2)}
    assert repository.failed_keys("m") == {3: files.key(3)}
    assert plan(VersionPolicy(), files, {2: files.key(2)}, {3: files.key(3)}).changes is False

    # A served version whose files now fail keeps serving, with the reason shown.
    repository.report("m", 2, "not a zip", files.key(2))
    assert repository.statuses("m")[0] == VersionStatus(
        2, READY, "its files on disk fail to load, the earlier ones are served: not a zip"
    )
    # A swap returns what it retires.
    runtime = repository.get("m", 2)
    assert repository.serve("m", {}, {}) == [runtime]
    assert repository.names() == []
