"""The protocol-neutral core: checks and plans a request, then hands it to its
model's batcher, which computes it on the model's device thread. Input checks and
plans seen before run on the event loop (a thread hop costs more than they do);
only a new plan goes to a host thread.

The servicer converts protobuf to these calls and back; nothing here knows gRPC.
A deadline is an absolute `time.monotonic()` instant (None: no deadline).

Readiness (`readiness` owns its states and moves): the server answers before its
models are loaded. A model is `loading` until every loaded version of it is warmed
up (`warm_up`), then `ready`; requests for a loading model get UNAVAILABLE (retry),
for one that failed NOT_FOUND with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from salience_server import checks, cost
from salience_server.batching import Batcher
from salience_server.errors import InvalidArgument, NotFound, Unavailable, allowed
from salience_server.explain.options import ExplainOptions, ExplainResult
from salience_server.metrics import Metrics
from salience_server.readiness import FAILED, LOADING, READY, Readiness, VersionStatus
from salience_server.repository import ModelRepository
from salience_server.seam import ModelDevice
from salience_server.settings import BatchingConfig, Settings

T = TypeVar("T")


def _rows(arrays: dict[str, np.ndarray]) -> int:
    """The batch a request claims, before its inputs are checked (for admission)."""
    return max((a.shape[0] if a.ndim else 1 for a in arrays.values()), default=1)


class InferenceCore:
    """Predict and explain on the models of one repository."""

    def __init__(
        self, repository: ModelRepository | None, settings: Settings, metrics: Metrics
    ) -> None:
        # Empty until the models are loaded (`attach`): the server answers meanwhile.
        self.repository = repository if repository is not None else ModelRepository({})
        self.readiness = Readiness()
        self.settings = settings
        self.metrics = metrics
        # Host work only (planning new options, which may build derived models):
        # device calls run on each model's own thread, inside its batcher.
        self._host = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="salience-host"
        )
        self._batchers: dict[tuple[str, int], Batcher] = {}
        # Hot reload: requests holding each runtime, and batchers being retired.
        self._leases: dict[ModelDevice, int] = {}
        self._idle: dict[ModelDevice, asyncio.Event] = {}
        self._retiring: set[Batcher] = set()
        self._draining = False  # shutting down: every batcher refuses new requests

    @property
    def batchers(self) -> Mapping[tuple[str, int], Batcher]:
        """The batchers made so far, by model name and version."""
        return MappingProxyType(self._batchers)

    def batching_config(self, runtime: ModelDevice) -> BatchingConfig:
        """A model's batching: the server's settings with its configuration's overrides
        (warm-up runs the same buckets its batcher pads to).
        """
        return runtime.config.batching.apply(self.settings.batching_for(runtime.name))

    def batcher(self, runtime: ModelDevice) -> Batcher:
        """The batcher of a model version, made on first use (on the event loop)."""
        key = (runtime.name, runtime.version)
        batcher = self._batchers.get(key)
        # Another runtime's batcher: a reload swapped this version (the old one retires).
        if batcher is None or batcher.runtime is not runtime:
            config = self.batching_config(runtime)
            batcher = self._batchers[key] = Batcher(runtime, config, self.metrics)
            if self._draining:
                batcher.drain()  # a model first asked for during shutdown refuses too
        return batcher

    # Hot reload ---------------------------------------------------------------

    @contextmanager
    def _lease(self, runtime: ModelDevice) -> Iterator[None]:
        """Holds a runtime for one request, from resolving it to its answer."""
        self._leases[runtime] = self._leases.get(runtime, 0) + 1
        try:
            yield
        finally:
            left = self._leases.pop(runtime) - 1
            if left:
                self._leases[runtime] = left
            elif runtime in self._idle:
                self._idle[runtime].set()

    def retire(self, runtime: ModelDevice) -> Awaitable[None]:
        """Ends a runtime the repository no longer serves (call it in the same step as
        the swap, before a request can make the version a new batcher): the requests
        that resolved it before the swap finish on it, then its batcher closes; await
        the result for that. No new request can reach it, so it refuses none.
        """
        key = (runtime.name, runtime.version)
        batcher = self._batchers.get(key)
        if batcher is not None and batcher.runtime is runtime:
            del self._batchers[key]
            self._retiring.add(batcher)
            # Nobody new joins its queue: what comes goes out without waiting for company.
            batcher.hurry()
        else:
            batcher = None
        return self._retired(runtime, batcher)

    async def _retired(self, runtime: ModelDevice, batcher: Batcher | None) -> None:
        try:
            while self._leases.get(runtime, 0):
                await self._idle.setdefault(runtime, asyncio.Event()).wait()
            if batcher is not None:
                await batcher.aclose()
        finally:
            self._idle.pop(runtime, None)
            if batcher is not None:
                self._retiring.discard(batcher)

    def forget(self, name: str) -> None:
        """A model the repository no longer holds (its directory was removed)."""
        self.readiness.forget(name)

    # Readiness ----------------------------------------------------------------

    def expect(self, names: Iterable[str]) -> None:
        """Models that are being loaded: requests for them get UNAVAILABLE until ready."""
        for name in names:
            self.readiness.expect(name)

    def attach(self, repository: ModelRepository) -> None:
        """The loaded repository; its models stay `loading` until warmed up. Expected
        models it lacks failed to load: the repository's NOT_FOUND says why.
        """
        self.repository = repository
        loaded = set(repository.names())
        for name in self.readiness.names(LOADING):
            if name not in loaded:
                self.readiness.forget(name)
        self.expect(loaded)

    def warm_up(self, runtime: ModelDevice) -> None:
        """Runs a model version's default functions at every batch bucket (blocking)."""
        runtime.warm_up(self.batching_config(runtime).buckets)

    def set_ready(self, name: str) -> None:
        self.readiness.ready(name)

    def set_failed(self, name: str, reason: str) -> None:
        self.readiness.fail(name, reason)

    def fail_loading(self, reason: str) -> None:
        """Loading failed as a whole: every model still loading failed with `reason`."""
        for name in self.readiness.names(LOADING):
            self.set_failed(name, reason)

    def state(self, name: str) -> str | None:
        """`loading`, `ready` or `failed`; None for a model this core never expected."""
        return self.readiness.state(name)

    def ready_names(self) -> list[str]:
        """The models that serve requests now."""
        return self.readiness.names(READY)

    def statuses(self, name: str) -> list[VersionStatus]:
        """A model's versions as every reader shows them (`readiness.shown`): the
        repository's states, a warming model's loaded versions `loading`.
        """
        return self.readiness.shown(name, self.repository.statuses(name))

    def version_ready(self, name: str, version: int = 0) -> bool:
        """Whether a model (version 0) or one served version of it is ready."""
        return self.readiness.version_ready(name, self.repository.statuses(name), version)

    def runtime(self, name: str, version: int = 0) -> ModelDevice:
        """The runtime of a ready model version: UNAVAILABLE while it loads, NOT_FOUND
        (with the reason) when it failed or is not served.
        """
        state = self.readiness.state(name)
        if state == LOADING:
            raise Unavailable(f"model {name!r} is loading: retry in a moment")
        if state == FAILED:
            raise NotFound(
                f"model.name={name!r} is not served (it failed to load: "
                f"{self.readiness.reason(name)}): choose one of {allowed(self.ready_names())}"
            )
        return self.repository.get(name, version)

    def _claimed(self, runtime: ModelDevice, arrays: dict[str, np.ndarray]) -> int:
        """The rows a request is admitted for: at most its model's batch cap. A larger
        batch is refused by the input checks as INVALID_ARGUMENT, never as a full
        queue, whose RESOURCE_EXHAUSTED invites retries that can never succeed.
        """
        return min(_rows(arrays), runtime.config.limits.batch_size(self.settings.max_batch_size))

    def _check_cost(self, runtime: ModelDevice, estimate: cost.Cost, what: str) -> None:
        """Refuses at once a request over its model's caps in cost or map bytes."""
        limits = runtime.config.limits.cost(self.settings.cost_limits)
        try:
            cost.check(estimate, limits, what)
        except InvalidArgument:
            self.metrics.cost_refused.labels(runtime.name, "over_cap").inc(estimate.total)
            raise

    async def wait_for_room(self, name: str, version: int, rows: int = 1) -> None:
        """Returns once the model's queue has room for `rows` samples in a lane (or it
        is shutting down): a stream waits here before it reads its next frame.
        """
        await self.batcher(self.runtime(name, version)).wait_for_room(rows)

    async def queue_changed(self, name: str, version: int) -> None:
        """Returns once samples next leave the model's queue (or it is shutting down):
        a request refused for a full queue may be tried again then.
        """
        await self.batcher(self.runtime(name, version)).left()

    async def _on_host(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._host, work)

    def _check_inputs(
        self, runtime: ModelDevice, arrays: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        settings = self.settings
        return checks.check_inputs(
            runtime, arrays, settings.max_batch_size, settings.max_free_axis_size
        )

    async def predict(
        self,
        name: str,
        version: int,
        arrays: dict[str, np.ndarray],
        deadline: float | None = None,
    ) -> tuple[ModelDevice, list[np.ndarray]]:
        """The model's outputs for a batch of inputs keyed by input name."""
        runtime = self.runtime(name, version)
        with self._lease(runtime):
            batcher = self.batcher(runtime)
            # A full queue refuses before any work is spent on the request.
            batcher.admit(self._claimed(runtime, arrays), deadline)
            # numpy checks, on the loop: a thread hop costs more than they do.
            inputs = self._check_inputs(runtime, arrays)
            self._check_cost(runtime, cost.predict_cost(inputs), "Predict")
            return runtime, await batcher.predict(inputs, deadline)

    async def explain(
        self,
        name: str,
        version: int,
        arrays: dict[str, np.ndarray],
        options: ExplainOptions,
        deadline: float | None = None,
    ) -> tuple[ModelDevice, ExplainResult]:
        """Predictions and maps for a batch of inputs keyed by input name."""
        runtime = self.runtime(name, version)
        runtime.check_options(options, self.settings.limits)
        with self._lease(runtime):
            batcher = self.batcher(runtime)
            batcher.admit(self._claimed(runtime, arrays), deadline)
            inputs = self._check_inputs(runtime, arrays)
            rows = len(inputs[0])
            # Options seen before at this batch size are planned on the loop; new
            # ones on a host thread (planning may build derived models).
            plan = runtime.cached_plan(options, rows)
            if plan is None:
                plan = await self._on_host(lambda: runtime.plan(options, rows))
            # Before it queues: the plan knows its evaluations per row.
            self._check_cost(runtime, cost.explain_cost(inputs, plan), plan.resolved.method)
            return runtime, await batcher.explain(inputs, plan, deadline)

    def drain(self) -> None:
        """Shutdown has begun: queued requests go to the device without waiting for
        company, and new ones are refused.
        """
        self._draining = True
        for batcher in [*self._batchers.values(), *self._retiring]:
            batcher.drain()

    async def aclose(self) -> None:
        """Finishes what is queued, stops the threads, then releases the models."""
        for batcher in [*self._batchers.values(), *self._retiring]:
            await batcher.aclose()
        await asyncio.to_thread(self._host.shutdown, True)
        self.repository.close()
