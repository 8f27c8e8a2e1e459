"""The readiness state machine: every move of a model and of a version's marks,
allowed or refused, and the warming rule every reader shows.
"""

from __future__ import annotations

import itertools

import pytest

from salience_server import readiness
from salience_server.readiness import (
    FAILED,
    LOADING,
    MODEL_TRANSITIONS,
    READY,
    UNLOADING,
    VERSION_TRANSITIONS,
    IllegalTransition,
    Readiness,
    VersionStatus,
    shown,
    version_ready,
)
from salience_server.repository import ModelRepository

MODEL = [None, LOADING, READY, FAILED]
ALLOWED_MODEL_MOVES = {
    (None, LOADING),
    (None, READY),
    (LOADING, READY),
    (LOADING, FAILED),
    (LOADING, None),
    (READY, READY),
    (READY, None),
    (FAILED, READY),
    (FAILED, None),
}


def _at(state: str | None) -> Readiness:
    """A machine holding model "m" in `state` (None: not expected)."""
    machine = Readiness()
    if state is not None:
        machine.expect("m")
        if state == READY:
            machine.ready("m")
        elif state == FAILED:
            machine.fail("m", "broken")
    assert machine.state("m") == state
    return machine


def _move(machine: Readiness, after: str | None) -> None:
    if after == LOADING:
        machine._move("m", LOADING)
    elif after == READY:
        machine.ready("m")
    elif after == FAILED:
        machine.fail("m", "it broke")
    else:
        machine._move("m", None)


@pytest.mark.parametrize(("before", "after"), list(itertools.product(MODEL, MODEL)))
def test_every_model_move_is_allowed_or_raises_as_the_table_says(
    before: str | None, after: str | None
) -> None:
    machine = _at(before)
    allowed = (before, after) in ALLOWED_MODEL_MOVES
    assert (after in MODEL_TRANSITIONS[before]) == allowed
    if allowed:
        _move(machine, after)
        assert machine.state("m") == after
        assert machine.reason("m") == ("it broke" if after == FAILED else "")
    else:
        with pytest.raises(IllegalTransition, match="model 'm' cannot go from"):
            _move(machine, after)
        assert machine.state("m") == before  # a refused move changes nothing


def test_expect_and_forget_leave_known_and_unknown_models_alone() -> None:
    machine = _at(READY)
    machine.expect("m")  # already known: it keeps its state
    assert machine.state("m") == READY
    machine.forget("other")  # never expected: nothing to forget
    assert machine.state("other") is None
    machine.expect("other")
    assert machine.names(LOADING) == ["other"]
    assert machine.names(READY) == ["m"]


def test_a_snapshot_restores_the_same_states_and_reasons() -> None:
    machine = Readiness()
    for name in ("a", "b", "c"):
        machine.expect(name)
    machine.ready("a")
    machine.fail("b", "no weights")
    copy = Readiness(*machine.snapshot())
    assert [copy.state(n) for n in "abc"] == [READY, FAILED, LOADING]
    assert copy.reason("b") == "no weights"
    with pytest.raises(IllegalTransition, match="cannot be 'warm'"):
        Readiness({"a": "warm"})


STATUSES = [
    VersionStatus(0, FAILED, "config.toml is bad"),
    VersionStatus(1, UNLOADING),
    VersionStatus(2, READY),
    VersionStatus(3, READY, "its files on disk fail to load, the earlier ones are served: x"),
    VersionStatus(4, LOADING),
    VersionStatus(5, FAILED, "not a zip"),
]


def test_a_warming_models_ready_versions_show_as_loading_and_nothing_else_changes() -> None:
    warming = shown(LOADING, STATUSES)
    assert [s.state for s in warming] == [FAILED, UNLOADING, LOADING, LOADING, LOADING, FAILED]
    assert [(s.version, s.reason) for s in warming] == [(s.version, s.reason) for s in STATUSES]
    for model in (READY, FAILED, None):
        assert shown(model, STATUSES) == STATUSES


def test_only_a_ready_model_and_its_served_versions_are_ready() -> None:
    for version, expected in [(0, True), (1, False), (2, True), (3, True), (4, False), (5, False)]:
        assert version_ready(READY, STATUSES, version) is expected
    assert version_ready(READY, STATUSES, 9) is False
    for model in (LOADING, FAILED, None):
        assert not any(version_ready(model, STATUSES, v) for v in range(6))


def test_a_version_state_prefers_served_then_loading_then_unloading() -> None:
    state = readiness.version_state
    assert state(True, True, True) == READY
    assert state(False, True, True) == LOADING
    assert state(False, False, True) == UNLOADING
    assert state(False, False, False) == FAILED


class _Runtime:
    name, version = "m", 1


# Loading (new files of a version) and unloading (a retired runtime of it finishing
# its requests) are marks of their own: a version may carry both at once.
MARK_MOVES = [
    # mark, set before, set now, allowed
    ("loading", False, True, True),
    ("loading", True, False, True),
    ("loading", True, True, False),
    ("loading", False, False, False),
    ("unloading", False, True, True),
    ("unloading", True, False, True),
    ("unloading", True, True, False),
    ("unloading", False, False, False),
]


@pytest.mark.parametrize(("mark", "before", "after", "allowed"), MARK_MOVES)
def test_every_version_mark_move_is_allowed_or_raises_in_the_repository(
    mark: str, before: bool, after: bool, allowed: bool
) -> None:
    runtime = _Runtime()
    repository = ModelRepository({})

    def set_mark(on: bool) -> None:
        if mark == "loading":
            repository.mark_loading("m", 1, on)
        else:
            repository.mark_unloading(runtime, on)  # type: ignore[arg-type]

    if before:
        set_mark(True)
    state = LOADING if mark == "loading" else UNLOADING
    assert ((state if after else None) in VERSION_TRANSITIONS[state if before else None]) is allowed
    if allowed:
        set_mark(after)
        assert [s.state for s in repository.statuses("m")] == ([state] if after else [])
    else:
        with pytest.raises(IllegalTransition, match="model 'm' version 1 cannot go from"):
            set_mark(after)
        assert [s.state for s in repository.statuses("m")] == ([state] if before else [])


def test_a_version_may_load_new_files_while_its_retired_runtime_unloads() -> None:
    repository = ModelRepository({})
    runtime = _Runtime()
    repository.mark_unloading(runtime, True)  # type: ignore[arg-type]
    repository.mark_loading("m", 1, True)
    assert repository.statuses("m") == [VersionStatus(1, LOADING)]
    repository.mark_loading("m", 1, False)
    assert repository.statuses("m") == [VersionStatus(1, UNLOADING)]
    repository.mark_unloading(runtime, False)  # type: ignore[arg-type]
    assert repository.statuses("m") == []
