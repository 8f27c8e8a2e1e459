"""Hot reload: the server polls its model repository and applies what changed, with
no restart and no failed request.

Why polling (every `repository_poll_seconds`, default 2 s) rather than file-system
events: it works on every file system the repository may live on. inotify (and the
packages built on it, such as watchfiles) sees no change made by another machine on
NFS or SMB, and Kubernetes updates ConfigMap and projected volumes by swapping a
symlink, which a watch on the files misses; a poll only needs `stat`, costs one
call per file of the repository, and its delay is far below a model's load time.

Each poll stamps every model directory (`repository.snapshot`: each version's
files by size, mtime and inode, the model's other files — config.toml, labels —
by content). A model whose stamps changed is reconciled once they have held still
for one more poll, so a version still being copied in is not loaded half-written
(copying it elsewhere and renaming it into place is still the safest way).
Reconciling a model (`plan`, then `RepositoryWatcher.reconcile`):

- The version policy chooses among the versions that can be served: those on
  disk less those whose current files already failed to load (`repository.choose`).
- A chosen version that is not served, or was loaded from other files or another
  configuration, is loaded and warmed up on the reload thread, off the event loop.
  One that fails is reported (failures, log, `ModelMetadata.version_status`) and
  the policy chooses again without it: with `latest 1`, a broken version 3 leaves
  version 2 served. A served version whose files are rewritten with broken ones
  keeps serving what it loaded before; a broken config.toml changes nothing served.
- Then one swap (`ModelRepository.serve`) serves the new set. Requests that
  resolved a runtime before it finish on it; requests after it get the new ones
  (version 0 the highest); a request naming a version no longer served gets
  NOT_FOUND listing those that are.
- Runtimes no longer served (removed, dropped by the policy or replaced) are
  retired: their in-flight requests finish, their batcher drains and closes, and
  they are dropped (`InferenceCore.retire`). A removed model directory retires
  all of its versions; a new one is loaded like any change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from salience_server import devices
from salience_server.core import InferenceCore
from salience_server.devices import Placement
from salience_server.model_config import VersionPolicy
from salience_server.repository import (
    Key,
    Loader,
    ModelFiles,
    ModelSource,
    choose,
    failure_reason,
    load_version,
    no_version_reason,
    read_source,
    snapshot,
)
from salience_server.runtime import ModelRuntime

log = logging.getLogger(__name__)


# What to do: pure functions of the stamps, tested on their own ------------------


@dataclass(frozen=True)
class Plan:
    """What reconciling one model does: `load` these versions, then serve `serve`
    (the loaded ones and the `keep` ones), and retire the served ones in `unload`
    (dropped, or replaced by a version loaded again).
    """

    serve: tuple[int, ...]
    load: tuple[int, ...]
    keep: tuple[int, ...]
    unload: tuple[int, ...]

    @property
    def changes(self) -> bool:
        return bool(self.load or self.unload)


def plan(
    policy: VersionPolicy,
    files: ModelFiles,
    served: Mapping[int, Key],
    failed: Mapping[int | None, Key],
) -> Plan:
    """The plan for one model with a usable configuration.

    `served` says what each served version was loaded from, `failed` what each
    failed version failed with: a version fails again only when the files it would
    load now are the ones that failed (so changed files are tried again).
    """
    current = {version: files.key(version) for version in files.versions}
    broken = {v for v, key in failed.items() if v is not None and current.get(v) == key}
    serve = choose(policy, current, broken, kept=served)
    load = tuple(v for v in serve if served.get(v) != current[v] and v not in broken)
    keep = tuple(v for v in serve if v in served and v not in load)
    unload = tuple(sorted(v for v in served if v not in keep))
    return Plan(serve, load, keep, unload)


class ChangeTracker:
    """Which models to reconcile after each poll: those whose stamps changed and
    then stayed the same for one poll (a copy in progress keeps changing them).
    Every model is reconciled after the first two polls, in case something changed
    between the start-up load and the first poll (unchanged ones do nothing).
    """

    def __init__(self) -> None:
        self._last: dict[str, ModelFiles] | None = None
        self._pending: set[str] = set()

    def update(self, files: dict[str, ModelFiles]) -> list[str]:
        """The models to reconcile now, given the stamps of this poll."""
        if self._last is None:
            self._last, self._pending = files, set(files)
            return []
        last = self._last
        changed = {name for name in {*files, *last} if files.get(name) != last.get(name)}
        ready = self._pending - changed
        self._pending = (self._pending - ready) | changed
        self._last = files
        return sorted(ready)


# Doing it ---------------------------------------------------------------------------


ServingCallback = Callable[[str, bool], Awaitable[None]]


class RepositoryWatcher:
    """Polls a repository and reconciles the models of an InferenceCore with it.

    Everything but loading runs on the event loop, so swaps need no lock; loads
    run one at a time on a thread of their own, so a reload never takes the host
    threads requests are planned on. `on_serving(name, serving)` is told when a
    model starts or stops being served (the server's health service follows it).
    """

    def __init__(
        self,
        root: Path,
        core: InferenceCore,
        poll_seconds: float,
        *,
        placement: Placement | None = None,
        loader: Loader = load_version,
        on_serving: ServingCallback | None = None,
        allow_links_outside: bool = False,
    ) -> None:
        self.root = root
        self.core = core
        self.poll_seconds = poll_seconds
        self.placement = placement
        self.loader = loader
        self.on_serving = on_serving
        self.allow_links_outside = allow_links_outside
        self._tracker = ChangeTracker()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="salience-reload")
        self._retiring: set[asyncio.Task[None]] = set()
        self._unreadable = False

    async def run(self) -> None:
        """Polls until cancelled."""
        log.info("watching %s for model changes every %.3gs", self.root, self.poll_seconds)
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> None:
        """Stamps the repository once and reconciles the models that settled."""
        try:
            # Off the loop: stat calls on a network file system can be slow.
            # Only regular files are read (a FIFO would block this thread, and with
            # it hot reload and the process's exit, for ever): see `repository`.
            files = await asyncio.to_thread(
                snapshot, self.root, allow_links_outside=self.allow_links_outside
            )
        except OSError as err:
            # A mount that is briefly gone must not unload every model.
            if not self._unreadable:
                log.warning("cannot read the model repository (%s): serving on as before", err)
            self._unreadable = True
            return
        if self._unreadable:
            log.info("the model repository %s can be read again", self.root)
            self._unreadable = False
        for name in self._tracker.update(files):
            try:
                await self.reconcile(name, files.get(name))
            except Exception:  # a bug here must not end hot reload for every model
                log.exception("model %s: reloading failed; serving on as before", name)

    async def reconcile(self, name: str, files: ModelFiles | None) -> None:
        """Loads, swaps and retires what one model's files (None: gone) call for."""
        repository = self.core.repository
        if files is None:
            if name in repository.known():
                log.info("model %s: its directory is gone: unloading it", name)
                await self._swap(name, {}, {})
                repository.forget(name)
            return
        source = await asyncio.to_thread(read_source, files)
        served = repository.loaded_keys(name)
        if source.config is None:
            repository.report(name, None, source.error, (files.config, ()))
            runtimes = repository.runtimes(name)
            gone = [v for v in runtimes if v not in files.versions]
            if gone:  # a removed version stops even while the configuration is broken
                await self._swap(name, {v: r for v, r in runtimes.items() if v not in gone}, {})
            if served:
                log.warning(
                    "model %s keeps serving what it loaded before its config.toml broke", name
                )
            return
        policy = source.config.version_policy
        failed = repository.failed_keys(name)
        staged: dict[int, ModelRuntime] = {}
        while True:
            step = plan(policy, files, served, failed)
            todo = [v for v in step.load if v not in staged]
            if not todo:
                break
            for version in todo:
                why = (
                    "new"
                    if version not in served
                    else "config changed"
                    if served[version][0] != files.config
                    else "files changed"
                )
                runtime = await self._load(source, version, why)
                if runtime is None:
                    failed[version] = files.key(version)
                else:
                    staged[version] = runtime
        # Failures of versions gone from disk, or loaded now, are over.
        repository.forget(
            name, [v for v in failed if v is not None and (v not in files.versions or v in staged)]
        )
        if step.serve or any(failed.get(v) == files.key(v) for v in files.versions):
            repository.forget(name, [None])
        else:
            repository.report(name, None, no_version_reason(source), (files.config, ()))
        if step.changes:
            current = repository.runtimes(name)
            runtimes = {v: staged[v] if v in step.load else current[v] for v in step.serve}
            await self._swap(name, runtimes, {v: files.key(v) for v in step.load})

    async def _load(self, source: ModelSource, version: int, why: str) -> ModelRuntime | None:
        """Loads and warms up one version on the reload thread; None (reported) if
        it fails.
        """
        name = source.name
        assert source.config is not None  # reconcile loads only with a usable one
        assert source.files is not None
        config, path, key = source.config, source.versions[version], source.files.key(version)
        placement = self.placement or devices.current()

        def build() -> ModelRuntime:
            with devices.placing(placement):
                runtime = self.loader(name, version, path, config)
            self.core.warm_up(runtime)
            return runtime

        repository = self.core.repository
        log.info("model %s: loading version %d from %s (%s)", name, version, path, why)
        repository.mark_loading(name, version, True)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, build)
        except Exception as err:
            repository.report(name, version, failure_reason(err), key, err)
            return None
        finally:
            repository.mark_loading(name, version, False)

    async def _swap(
        self, name: str, runtimes: dict[int, ModelRuntime], keys: dict[int, Key]
    ) -> None:
        """Serves `runtimes` for a model at once, then retires what they replace."""
        core, repository = self.core, self.core.repository
        was_served = bool(repository.versions(name))
        retired = repository.serve(name, runtimes, keys)
        if runtimes:
            core.set_ready(name)
        else:
            core.forget(name)
        for runtime in retired:
            repository.mark_unloading(runtime, True)
            # Now, with the swap: a request coming next must not find its batcher.
            done = core.retire(runtime)
            task = asyncio.create_task(self._retire(runtime, done), name=f"salience-retire-{name}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info(
            "model %s: serving %s%s",
            name,
            f"versions {', '.join(map(str, sorted(runtimes)))}" if runtimes else "nothing",
            f"; unloading {', '.join(str(r.version) for r in retired)}" if retired else "",
        )
        if self.on_serving is not None and was_served != bool(runtimes):
            await self.on_serving(name, bool(runtimes))

    async def _retire(self, runtime: ModelRuntime, done: Awaitable[None]) -> None:
        try:
            await done
        finally:
            self.core.repository.mark_unloading(runtime, False)
        log.info("model %s: version %d unloaded", runtime.name, runtime.version)

    async def aclose(self) -> None:
        """After polling stopped (its task cancelled) and the server stopped: waits
        for the versions being retired, and ends the reload thread (a load still
        running there finishes unused).
        """
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancels a polling task and waits until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
