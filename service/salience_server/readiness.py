"""Readiness, in one place: the states of models and their versions, the moves
between them, and the one view that ListModels, GetModelMetadata, health, the
metrics and the Open Inference Protocol's ModelReady all show.

A model (every loaded version of it together) is `loading` from when the server
expects it until each loaded version is warmed up, then `ready`; `failed` when it
could not be loaded or warmed up. A version is `loading` while its files are read,
`ready` while it is served, `unloading` while a retired runtime finishes its
requests, and `failed` when its files (or, as version 0, its model's
configuration) cannot be loaded.

The warming rule: a version that is loaded (`ready` in the repository) of a model
that is still `loading` is shown `loading`; it serves no request yet.

A move the table does not allow is a bug in the caller: it raises
`IllegalTransition`. Nothing here imports TensorFlow or gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

LOADING = "loading"
READY = "ready"
FAILED = "failed"
UNLOADING = "unloading"

MODEL_STATES = (LOADING, READY, FAILED)
"""Every state of a model as a whole."""

VERSION_STATES = (LOADING, READY, FAILED, UNLOADING)
"""Every state a model version can be in, in the order the metrics list them."""

# A model's allowed moves; None: a model the server does not (or no longer) expect.
MODEL_TRANSITIONS: Mapping[str | None, frozenset[str | None]] = MappingProxyType(
    {
        # Expected at start-up, or served by a reload without a start-up load.
        None: frozenset({LOADING, READY}),
        # Warmed up, failed, or dropped (not in the loaded repository, or removed).
        LOADING: frozenset({READY, FAILED, None}),
        # A reload serves it again (new versions), or its directory is removed.
        READY: frozenset({READY, None}),
        # A reload serves fixed files, or its directory is removed.
        FAILED: frozenset({READY, None}),
    }
)

# The moves of a version's two marks, each on its own: `loading` while new files of
# it load, `unloading` while a retired runtime of it finishes its requests (a
# version may carry both, and be served meanwhile: `version_state` ranks them).
VERSION_TRANSITIONS: Mapping[str | None, frozenset[str | None]] = MappingProxyType(
    {
        None: frozenset({LOADING, UNLOADING}),
        LOADING: frozenset({None}),
        UNLOADING: frozenset({None}),
    }
)


class IllegalTransition(RuntimeError):
    """A readiness move the state machine does not allow: a bug in its caller."""


def check(
    table: Mapping[str | None, frozenset[str | None]],
    what: str,
    before: str | None,
    after: str | None,
) -> None:
    """Raises IllegalTransition unless `table` allows `before` -> `after`."""
    if after not in table.get(before, frozenset()):
        raise IllegalTransition(
            f"{what} cannot go from {before or 'unknown'} to {after or 'unknown'}"
        )


@dataclass(frozen=True)
class VersionStatus:
    """One version as metadata reports it (version 0: the model's configuration)."""

    version: int
    state: str  # one of VERSION_STATES
    reason: str = ""


def version_state(served: bool, loading: bool, unloading: bool) -> str:
    """The state of a numbered version the repository knows: a served version is
    ready (even while newer files of it load, or when they failed), then loading,
    then unloading; otherwise it failed.
    """
    if served:
        return READY
    if loading:
        return LOADING
    if unloading:
        return UNLOADING
    return FAILED


def shown(model: str | None, statuses: Iterable[VersionStatus]) -> list[VersionStatus]:
    """What every reader shows of a model's versions, given the model's state: the
    repository's statuses with the warming rule applied.
    """
    warming = model == LOADING
    return [replace(s, state=LOADING) if warming and s.state == READY else s for s in statuses]


def version_ready(model: str | None, statuses: Iterable[VersionStatus], version: int) -> bool:
    """Whether a model (version 0) or one version of it is ready to serve."""
    if model != READY:
        return False
    return not version or any(
        s.version == version and s.state == READY for s in shown(model, statuses)
    )


class Readiness:
    """The readiness of every model the server expects, moved only as the table allows."""

    def __init__(
        self, states: Mapping[str, str] | None = None, reasons: Mapping[str, str] | None = None
    ) -> None:
        self._states: dict[str, str] = dict(states or {})
        self._reasons: dict[str, str] = dict(reasons or {})
        for name, state in self._states.items():
            if state not in MODEL_STATES:
                raise IllegalTransition(f"model {name!r} cannot be {state!r}")

    def snapshot(self) -> tuple[dict[str, str], dict[str, str]]:
        """The states and failure reasons by model (copies), to mirror elsewhere."""
        return dict(self._states), dict(self._reasons)

    def _move(self, name: str, after: str | None) -> None:
        check(MODEL_TRANSITIONS, f"model {name!r}", self._states.get(name), after)
        if after is None:
            self._states.pop(name, None)
            self._reasons.pop(name, None)
        else:
            self._states[name] = after
            if after != FAILED:
                self._reasons.pop(name, None)

    def expect(self, name: str) -> None:
        """A model being loaded; one already known keeps its state."""
        if name not in self._states:
            self._move(name, LOADING)

    def ready(self, name: str) -> None:
        self._move(name, READY)

    def fail(self, name: str, reason: str) -> None:
        self._move(name, FAILED)
        self._reasons[name] = reason

    def forget(self, name: str) -> None:
        """A model no longer expected (or never loaded); unknown ones are left alone."""
        if name in self._states:
            self._move(name, None)

    def state(self, name: str) -> str | None:
        """`loading`, `ready` or `failed`; None for a model never expected."""
        return self._states.get(name)

    def reason(self, name: str) -> str:
        return self._reasons.get(name, "")

    def names(self, state: str) -> list[str]:
        """The models in `state`, sorted."""
        return sorted(name for name, s in self._states.items() if s == state)

    def shown(self, name: str, statuses: Iterable[VersionStatus]) -> list[VersionStatus]:
        """`shown` for this model's state."""
        return shown(self._states.get(name), statuses)

    def version_ready(self, name: str, statuses: Iterable[VersionStatus], version: int) -> bool:
        return version_ready(self._states.get(name), statuses, version)
