"""Dynamic batching: per model one queue, one batching task and one device thread.

Requests are checked and planned before they queue, so a bad one is answered
without touching the device. The batching task merges queued requests whose work
can share one device call — predictions with predictions, explanations with an
equal `Graph` — and whose inputs and per-sample params have equal sample shapes,
up to `max_device_batch_size` samples or until the oldest of them has waited
`max_queue_delay`. The merged batch is padded up to a bucket size by repeating its
last real row (a valid sample for any model, and every computation is per sample),
or, where that would pad more than a quarter of the call, cut to the bucket below
(`BatchingConfig.take`), and handed to the model's single device thread, which runs
one `compute` and then each request's `finish` on its own rows. The pad rows are
split off before any finish, so they never reach a caller.

A request larger than a device call is split across consecutive calls (its rows
fill what room a batch has left) and reassembled in order before its `finish`.

Failures: a device call of several requests that raises (an input the model
fails on, a device out of memory) is computed again once per request, alone, so
only the requests at fault fail; their callers get the error (INTERNAL;
RESOURCE_EXHAUSTED for device memory, INVALID_ARGUMENT for inputs the model's
ops refuse), and the model serves on.

Lanes: every request's cost is estimated before it queues (`salience_server.cost`:
rows × evaluations × input elements). Predicts, and explanations costing at most
`light_request_cost`, queue in the light lane; costlier explanations in the heavy
lane. A heavy request's rows are split over device calls of at most
`max_call_cost` each (at least one row a call), and between device calls the
batcher picks the lane that is owed most: weighted fair queueing by cost, each
lane charged the cost of the calls it dispatched, the heavy lane weighted
`heavy_share`. A lane that was empty starts level with the other (no credit for
idle time), and ties go to the light lane, so a light request arriving during a
heavy call is the next call, and a heavy flood costs a light request at most the
one bounded call already on the device; under a flood of light work the heavy
lane still gets its share. Why this and not strict priority: strict priority would
starve heavy work under sustained light load; why chunks: a device call cannot
be pre-empted, so the wait of a light request is bounded only if calls are.

Fairness within a lane: the next batch is always the oldest queued request's,
except that a batch already full of another kind may go first while the oldest
waits for company; so no graph waits longer than its delay plus one device call.

Backpressure: per model and lane, at most `max_queue_size` samples and
`max_queue_cost` of cost wait; a request that does not fit is refused at once
with RESOURCE_EXHAUSTED (a heavy flood fills only the heavy lane's room), and
`wait_for_room` lets a stream wait for room instead. A request whose caller went
away (its waiting task is cancelled, and with it its future) or whose deadline
passed is dropped before it reaches the device. Every clock here is
`time.monotonic`.

While a device call runs, the next batch keeps filling: with one device thread
per model there is never more than one call in flight on a model, and the time a
call takes is the time the next batch has to gather.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from salience_server.cost import Cost, explain_cost, predict_cost
from salience_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    QueueFull,
    Unavailable,
    deadline_passed,
)
from salience_server.explain.options import ExplainResult
from salience_server.explain.plan import Plan
from salience_server.metrics import Metrics
from salience_server.settings import BatchingConfig

if TYPE_CHECKING:
    from salience_server.seam import ModelDevice

log = logging.getLogger(__name__)

PREDICT = "predict"
EXPLAIN = "explain"

# Lanes, by index; their names label metrics.
LIGHT = 0
HEAVY = 1
LANES = ("light", "heavy")

Key = tuple[Hashable, ...]
"""What must be equal for two requests to share a device call."""


def _signature(arrays: Sequence[np.ndarray]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Sample shapes and dtypes: arrays are concatenated along the batch axis only."""
    return tuple((a.shape[1:], a.dtype.str) for a in arrays)


def _merge(blocks: Sequence[np.ndarray], pad: int) -> np.ndarray:
    """Row blocks as one batch, padded with copies of the last real row."""
    if pad:
        blocks = [*blocks, np.repeat(blocks[-1][-1:], pad, axis=0)]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class _Job:
    """One request: its checked inputs, its plan and the future its caller awaits.

    `taken` and `gone` belong to the event loop; `parts` and `failed` to the
    device thread.
    """

    __slots__ = (
        "deadline",
        "enqueued_at",
        "failed",
        "future",
        "gone",
        "heavy_mark",
        "inputs",
        "key",
        "kind",
        "lane",
        "parts",
        "plan",
        "row_cost",
        "rows",
        "taken",
    )

    def __init__(
        self,
        kind: str,
        key: Key,
        inputs: Sequence[np.ndarray],
        plan: Plan | None,
        deadline: float | None,
        future: asyncio.Future[Any],
        now: float,
        lane: int = LIGHT,
        row_cost: int = 1,
    ) -> None:
        self.kind = kind
        self.lane = lane
        self.row_cost = row_cost  # the cost of each of its rows
        self.heavy_mark = 0  # heavy calls dispatched before it queued
        self.key = key
        self.inputs = inputs
        self.plan = plan
        self.rows = len(inputs[0])
        self.deadline = deadline
        self.future = future
        self.enqueued_at = now
        self.taken = 0  # rows handed to device calls so far
        self.gone = False  # cancelled or expired: its remaining rows never go out
        self.failed = False  # a device call holding some of its rows failed
        self.parts: list[tuple[list[Any], dict[str, Any]]] = []  # computed row blocks


@dataclass(frozen=True)
class _Piece:
    """Rows start:stop of a job inside one device call."""

    job: _Job
    start: int
    stop: int


@dataclass(frozen=True)
class _Batch:
    kind: str
    pieces: list[_Piece]
    rows: int  # real samples
    size: int  # padded to a bucket
    lane: int = LIGHT


@dataclass
class BatchStats:
    """Counts of what reached the device (tests and benchmarks read them)."""

    calls: int = 0
    samples: int = 0  # real samples, padding excluded
    padding: int = 0
    pieces: int = 0  # request slices; a split request counts once per call
    max_requests_per_call: int = 0
    lane_calls: list[int] = field(default_factory=lambda: [0, 0])  # by lane
    # The most heavy calls dispatched between a light request's queueing and its
    # own call: 0 while the light lane is within its share (light goes first).
    max_heavy_calls_before_light: int = 0
    room_waits: int = 0  # times a caller (a stream) waited for room in a full queue


class Batcher:
    """The queue, the batching task and the device thread of one model runtime."""

    def __init__(self, runtime: ModelDevice, config: BatchingConfig, metrics: Metrics) -> None:
        self.runtime = runtime
        self.config = config
        self.stats = BatchStats()
        model = runtime.name
        self._metrics = metrics
        self._wait_seconds = metrics.queue_wait_seconds.labels(model)
        self._batch_size = metrics.batch_size.labels(model)
        self._batch_requests = metrics.batch_requests.labels(model)
        self._depth = metrics.queue_depth.labels(model)
        # Series by kind, made on first use (a predict-only model shows no explain
        # series), then reused: `labels()` costs more than the update.
        self._samples: dict[str, Any] = {}
        self._compute_seconds: dict[str, Any] = {}
        metrics.queue_capacity.labels(model).set(config.max_queue_size)
        # One thread: device calls of a model never overlap, so a batch never
        # competes with another for the device's memory or cores. It lives inside
        # the model's device scope, where its weights are.
        self._device = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"salience-device-{model}-{runtime.version}",
            initializer=runtime.enter_device,
        )
        self._lanes: tuple[deque[_Job], deque[_Job]] = (deque(), deque())
        self._queued = 0  # samples waiting, not yet handed to the device
        self._queued_by_key: dict[Key, int] = {}
        self._row_cost_by_key: dict[Key, int] = {}
        self._lane_rows = [0, 0]
        self._lane_cost = [0, 0]
        # Weighted fair queueing: each lane's dispatched cost over its weight, exact
        # (rational), so that equal shares tie exactly and ties go to the light lane.
        heavy = Fraction(config.heavy_share).limit_denominator(1000)
        self._weights = (1 - heavy, heavy)
        self._served = [Fraction(0), Fraction(0)]
        self._heavy_calls = 0
        self._room: asyncio.Future[None] | None = None  # settled when rows leave
        self._queue_cost = tuple(metrics.queue_cost.labels(model, lane) for lane in LANES)
        self._cost_admitted = tuple(metrics.cost_admitted.labels(model, lane) for lane in LANES)
        self._busy = False
        self._flush_mark = -math.inf  # jobs queued at or before it go without waiting
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Submitting ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Samples waiting for the device."""
        return self._queued

    def _fits(self, lane: int, rows: int, cost: int) -> bool:
        config = self.config
        return (
            self._lane_rows[lane] + rows <= config.max_queue_size
            and self._lane_cost[lane] + cost <= config.max_queue_cost
        )

    def has_room(self, rows: int = 1, cost: int = 0, lane: int | None = None) -> bool:
        """Whether a request of `rows` and `cost` fits its lane's queue now (any
        lane's when `lane` is None).
        """
        lanes = (LIGHT, HEAVY) if lane is None else (lane,)
        return any(self._fits(k, rows, cost) for k in lanes)

    async def wait_for_room(self, rows: int = 1, cost: int = 0, lane: int | None = None) -> None:
        """Returns once `has_room`, or once the model shuts down (its admission then
        refuses with UNAVAILABLE): how a stream waits instead of failing.
        """
        while not self._closing and not self.has_room(rows, cost, lane):
            await self.left()

    async def left(self) -> None:
        """Returns once samples next leave the queue (or at once when shutting down)."""
        if self._closing:
            return
        self.stats.room_waits += 1
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        # Shielded: one waiter going away must not cancel the others' wake-up.
        await asyncio.shield(self._room)

    def admit(
        self, rows: int, deadline: float | None, cost: int = 0, lane: int | None = None
    ) -> None:
        """Refuses at once what cannot be queued: shutting down, expired, or no room
        (in `lane`, or in either lane when it is not known yet).
        """
        name = self.runtime.name
        if self._closing:
            raise Unavailable(f"model {name!r} is shutting down: retry on another server")
        if deadline is not None and time.monotonic() >= deadline:
            self._metrics.refused.labels(name, "deadline_exceeded").inc()
            raise DeadlineExceeded(f"the deadline passed before model {name!r} could queue it")
        config = self.config
        if cost > config.max_queue_cost:
            self._metrics.cost_refused.labels(name, "over_cap").inc(cost)
            raise InvalidArgument(
                f"the request costs {cost} element-evaluations, over model {name!r}'s "
                f"max_queue_cost={config.max_queue_cost}: it would never fit in the queue; "
                "send fewer rows, fewer samples or steps, or a smaller input"
            )
        if self.has_room(rows, cost, lane):
            return
        self._metrics.refused.labels(name, "queue_full").inc()
        if cost:
            self._metrics.cost_refused.labels(name, "queue_full").inc(cost)
        if lane is None:
            lane = min((LIGHT, HEAVY), key=lambda k: self._lane_rows[k])
        queued = self._lane_rows[lane]
        where = " in its heavy lane" if lane == HEAVY else ""
        if queued + rows > config.max_queue_size:
            raise QueueFull(
                f"model {name!r} is at capacity: {queued} samples are queued{where} and "
                f"this request's {rows} would pass its max_queue_size="
                f"{config.max_queue_size}; retry after a back-off"
            )
        raise QueueFull(
            f"model {name!r} is at capacity: {self._lane_cost[lane]} element-evaluations "
            f"are queued{where} and this request's {cost} would pass its max_queue_cost="
            f"{config.max_queue_cost}; retry after a back-off"
        )

    async def predict(
        self, inputs: Sequence[np.ndarray], deadline: float | None = None
    ) -> list[np.ndarray]:
        """The model's outputs for checked inputs, computed in a shared device call."""
        cost = predict_cost(inputs)
        key: Key = (PREDICT, LIGHT, _signature(inputs))
        result: list[np.ndarray] = await self._submit(
            PREDICT, key, inputs, None, deadline, cost, LIGHT
        )
        return result

    async def explain(
        self, inputs: Sequence[np.ndarray], plan: Plan, deadline: float | None = None
    ) -> ExplainResult:
        """A planned explanation, computed in a device call shared with equal graphs."""
        params = sorted(plan.params.items())
        cost = explain_cost(inputs, plan)
        lane = LIGHT if cost.total <= self.config.light_request_cost else HEAVY
        key: Key = (
            EXPLAIN,
            lane,
            plan.graph,
            plan.share,
            _signature(inputs),
            tuple(k for k, _ in params),
            _signature([v for _, v in params]),
        )
        result: ExplainResult = await self._submit(EXPLAIN, key, inputs, plan, deadline, cost, lane)
        return result

    async def _submit(
        self,
        kind: str,
        key: Key,
        inputs: Sequence[np.ndarray],
        plan: Plan | None,
        deadline: float | None,
        cost: Cost,
        lane: int,
    ) -> Any:
        rows = len(inputs[0])
        self.admit(rows, deadline, cost.total, lane)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(kind, key, inputs, plan, deadline, loop.create_future(), now, lane, cost.per_row)
        job.heavy_mark = self._heavy_calls
        job.future.add_done_callback(lambda future: self._settled(job, future))
        if not self._lane_rows[lane]:
            # A lane with nothing queued starts level with the other: no credit for
            # the time it was idle (or all level when both were).
            other = HEAVY - lane
            if self._lane_rows[other]:
                self._served[lane] = max(self._served[lane], self._served[other])
            else:
                self._served = [max(self._served)] * 2
        self._lanes[lane].append(job)
        self._row_cost_by_key[key] = cost.per_row
        self._count(job, rows)
        self._cost_admitted[lane].inc(cost.total)
        if self._task is None:
            self._loop = loop
            self._task = loop.create_task(self._run(), name=f"batcher-{self.runtime.name}")
        self._wakeup.set()
        if deadline is None:
            return await job.future
        timer = asyncio.timeout(deadline - now)
        try:
            async with timer:
                return await job.future
        except TimeoutError:
            # Asked of the timer, not of the future: when the batching task settles
            # the future (`_expire`) in the same loop step as the timer fires, the
            # future is done but not cancelled, and the deadline still passed.
            if not timer.expired():
                raise  # the work itself failed with a TimeoutError
            raise DeadlineExceeded(
                f"the deadline passed while the request waited for model "
                f"{self.runtime.name!r} ({time.monotonic() - now:.3f} s after it queued)"
            ) from None

    def _count(self, job: _Job, rows: int) -> None:
        """Adds (or with negative rows removes) queued samples of one job."""
        key = job.key
        self._queued += rows
        left = self._queued_by_key.get(key, 0) + rows
        if left:
            self._queued_by_key[key] = left
        else:
            del self._queued_by_key[key]
            self._row_cost_by_key.pop(key, None)
        cost = rows * job.row_cost
        self._lane_rows[job.lane] += rows
        self._lane_cost[job.lane] += cost
        self._queue_cost[job.lane].inc(cost)
        if rows > 0:
            self._depth.inc(rows)
        else:
            self._depth.dec(-rows)
            if self._room is not None and not self._room.done():
                self._room.set_result(None)

    def _settled(self, job: _Job, future: asyncio.Future[Any]) -> None:
        """A cancelled future (caller gone or deadline passed) gives up its queued rows."""
        if future.cancelled() and not job.gone:
            # A caller that goes away this close to its deadline went because of it
            # (the same rule as the request's status, errors.deadline_passed).
            expired = job.deadline is not None and deadline_passed(
                job.deadline - time.monotonic(), job.deadline - job.enqueued_at
            )
            self._drop(job, "deadline_exceeded" if expired else "cancelled")

    def _drop(self, job: _Job, reason: str | None) -> None:
        """Takes a job's remaining rows out of the queue; `reason` counts it as refused."""
        job.gone = True
        left = job.rows - job.taken
        if left > 0:
            self._count(job, -left)
            if reason is not None:
                self._metrics.refused.labels(self.runtime.name, reason).inc()
            self._wakeup.set()

    def _expire(self, job: _Job) -> None:
        """A job found past its deadline before its waiter's timer fired."""
        self._drop(job, "deadline_exceeded")
        if not job.future.done():
            job.future.set_exception(
                DeadlineExceeded(
                    f"the deadline passed while the request waited for model {self.runtime.name!r}"
                )
            )

    # Batching -----------------------------------------------------------------

    async def _run(self) -> None:
        """The batching task: forms a batch whenever the device thread is free."""
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            step: _Batch | float | None = None
            try:
                step = self._next()
                if isinstance(step, _Batch):
                    self._dispatch(step)
                    continue
            except Exception as err:  # a bug here must not stop the model: fail what waits
                log.exception("model %s: batching failed", self.runtime.name)
                if isinstance(step, _Batch):
                    self._busy = False
                    self._fail(step, err)
                self._fail_pending()
                continue
            if self._closing and not any(self._lanes) and not self._busy:
                return
            if step is None:
                await self._wakeup.wait()
            else:
                timer = loop.call_later(step, self._wakeup.set)
                try:
                    await self._wakeup.wait()
                finally:
                    timer.cancel()

    def _head(self, lane: int, now: float) -> _Job | None:
        """The oldest live job of a lane, after dropping finished and expired ones."""
        pending = self._lanes[lane]
        while pending:
            head = pending[0]
            if head.gone or head.taken >= head.rows:
                pending.popleft()
            elif head.deadline is not None and now >= head.deadline:
                pending.popleft()
                self._expire(head)
            else:
                return head
        return None

    def _next(self) -> _Batch | float | None:
        """The batch to send now, or how long to wait for one (None: until woken).

        The lane owed most goes first (the least dispatched cost for its weight;
        ties to the light lane); when its oldest request waits for company, the
        other lane's ready batch may go meanwhile.
        """
        if self._busy:
            return None
        now = time.monotonic()
        heads = [(lane, head) for lane in (LIGHT, HEAVY) if (head := self._head(lane, now))]
        heads.sort(key=lambda item: (self._served[item[0]], item[0]))
        wait: float | None = None
        for lane, head in heads:
            step = self._ready(lane, head, now)
            if isinstance(step, _Batch):
                return step
            if step is not None:
                wait = step if wait is None else min(wait, step)
        return wait

    def _call_rows(self, key: Key) -> int:
        """Most rows of one key a device call takes: `max_device_batch_size`, fewer
        where its rows cost more than `max_call_cost` together (at least one).
        """
        row_cost = self._row_cost_by_key.get(key, 1)
        return max(1, min(self.config.max_device_batch_size, self.config.max_call_cost // row_cost))

    def _ready(self, lane: int, head: _Job, now: float) -> _Batch | float | None:
        """A lane's batch to send now, or how long its oldest request may still wait."""
        config = self.config
        if not config.enabled:
            return self._take(head.key, only=head)
        close_at = head.enqueued_at + config.max_queue_delay
        if (
            self._queued_by_key[head.key] >= self._call_rows(head.key)
            or now >= close_at
            or head.enqueued_at <= self._flush_mark
        ):
            return self._take(head.key)
        for key, rows in self._queued_by_key.items():
            if _lane_of(key) == lane and rows >= self._call_rows(key):
                return self._take(key)
        return close_at - now

    def _take(self, key: Key, only: _Job | None = None) -> _Batch | None:
        """Takes the oldest rows of one key (of one job when batching is off)."""
        queued = only.rows - only.taken if only is not None else self._queued_by_key[key]
        limit = self.config.take(min(queued, self._call_rows(key)))
        now = time.monotonic()
        pieces: list[_Piece] = []
        rows = 0
        kind = PREDICT
        keep: deque[_Job] = deque()
        lane = only.lane if only is not None else _lane_of(key)
        for job in self._lanes[lane]:
            if job.gone or job.taken >= job.rows:
                continue
            if rows < limit and (job is only if only is not None else job.key == key):
                if job.deadline is not None and now >= job.deadline:
                    self._expire(job)
                    continue
                n = min(job.rows - job.taken, limit - rows)
                if job.taken == 0:
                    self._wait_seconds.observe(now - job.enqueued_at)
                pieces.append(_Piece(job, job.taken, job.taken + n))
                job.taken += n
                rows += n
                kind = job.kind
                self._count(job, -n)
            if job.taken < job.rows:
                keep.append(job)
        if lane == LIGHT:
            self._lanes = (keep, self._lanes[HEAVY])
        else:
            self._lanes = (self._lanes[LIGHT], keep)
        if not pieces:
            return None
        return _Batch(kind, pieces, rows, self.config.bucket(rows), lane)

    def _dispatch(self, batch: _Batch) -> None:
        self._busy = True
        requests = len({id(p.job) for p in batch.pieces})
        stats = self.stats
        stats.calls += 1
        stats.samples += batch.rows
        stats.padding += batch.size - batch.rows
        stats.pieces += len(batch.pieces)
        stats.max_requests_per_call = max(stats.max_requests_per_call, requests)
        lane = batch.lane
        stats.lane_calls[lane] += 1
        # Charged when it goes, in the cost it makes the device do (padding included).
        self._served[lane] += batch.size * batch.pieces[0].job.row_cost / self._weights[lane]
        if lane == HEAVY:
            self._heavy_calls += 1
        else:
            for piece in batch.pieces:
                if piece.start == 0:
                    passed = self._heavy_calls - piece.job.heavy_mark
                    stats.max_heavy_calls_before_light = max(
                        stats.max_heavy_calls_before_light, passed
                    )
        self._batch_size.observe(batch.rows)
        self._batch_requests.observe(requests)
        samples = self._samples.get(batch.kind)
        if samples is None:
            samples = self._samples[batch.kind] = self._metrics.samples.labels(
                self.runtime.name, batch.kind
            )
        samples.inc(batch.rows)
        if batch.size > batch.rows:
            self._metrics.padding.labels(self.runtime.name).inc(batch.size - batch.rows)
        loop = self._loop
        assert loop is not None  # set with the task that calls this
        work = self._device.submit(self._compute, batch)
        work.add_done_callback(lambda done: loop.call_soon_threadsafe(self._computed, batch, done))

    def _computed(self, batch: _Batch, done: Future[list[tuple[_Job, Any, Any]]]) -> None:
        """Back on the event loop: resolves every finished job of a device call."""
        self._busy = False
        self._wakeup.set()
        try:
            outcomes = done.result()
        except BaseException as err:  # _compute catches everything; this is a last resort
            outcomes = [(p.job, None, err) for p in batch.pieces]
        for job, value, error in outcomes:
            if job.future.done():
                continue  # its caller went away while it was computed
            if error is None:
                job.future.set_result(value)
            else:
                self._drop(job, None)  # a split job's later rows are not worth computing
                job.future.set_exception(error)

    def _fail(self, batch: _Batch, error: BaseException) -> None:
        for piece in batch.pieces:
            if not piece.job.future.done():
                self._drop(piece.job, None)
                piece.job.future.set_exception(error)

    def _fail_pending(self) -> None:
        error = Unavailable(f"model {self.runtime.name!r} could not batch the request: retry")
        for pending in self._lanes:
            for job in pending:
                if not job.gone:
                    self._drop(job, None)
                    if not job.future.done():
                        job.future.set_exception(error)
            pending.clear()

    # On the device thread -------------------------------------------------------

    def _compute(self, batch: _Batch) -> list[tuple[_Job, Any, Any]]:
        """One device call, then each completed job's finish: (job, result, error).

        A failed call of several requests is computed again once per request,
        alone, so that an input the model fails on (or a merged batch too large for
        the device's memory) fails its own request only, not those merged with it.
        """
        start = time.perf_counter()
        runtime = self.runtime
        pieces = batch.pieces
        pad = batch.size - batch.rows
        try:
            inputs = [
                _merge([p.job.inputs[i][p.start : p.stop] for p in pieces], pad)
                for i in range(len(pieces[0].job.inputs))
            ]
            if batch.kind == PREDICT:
                outputs: Sequence[Any] = runtime.predict(inputs)
                raw: Mapping[str, Any] = {}
            else:
                first = pieces[0].job.plan
                assert first is not None  # explain jobs always carry their plan
                params = {
                    name: _merge([_plan(p).params[name][p.start : p.stop] for p in pieces], pad)
                    for name in first.params
                }
                outputs, raw = runtime.compute(first.graph, inputs, params)
            sizes = [p.stop - p.start for p in pieces] + ([pad] if pad else [])
            together = self._finish_together(batch, sizes, outputs, raw)
            split_outputs = [runtime.split_rows(o, sizes) for o in outputs]
            split_raw = {name: runtime.split_rows(t, sizes) for name, t in raw.items()}
        except Exception as err:
            live = [p for p in pieces if not (p.job.failed or p.job.gone)]
            if len(live) > 1:
                # Costs one device call per request, and only when a call fails.
                log.warning(
                    "model %s: a device call of %d requests failed (%s); computing "
                    "each alone to fail only the one(s) at fault",
                    runtime.name,
                    len(live),
                    type(err).__name__,
                )
                retried: list[tuple[_Job, Any, Any]] = []
                for p in live:
                    rows = p.stop - p.start
                    alone = _Batch(batch.kind, [p], rows, self.config.bucket(rows), batch.lane)
                    retried += self._compute(alone)
                return retried
            log.debug("model %s: a device call failed", runtime.name, exc_info=True)
            outcomes: list[tuple[_Job, Any, Any]] = []
            for piece in pieces:
                if not piece.job.failed:
                    piece.job.failed = True
                    piece.job.parts = []
                    outcomes.append((piece.job, None, err))
            return outcomes
        outcomes = []
        for k, piece in enumerate(pieces):
            job = piece.job
            if job.failed or job.gone:
                continue
            if k in together:
                outcomes.append((job, *together[k]))
                continue
            job.parts.append(
                ([o[k] for o in split_outputs], {n: t[k] for n, t in split_raw.items()})
            )
            if piece.stop < job.rows:
                continue  # the rest of its rows come in later device calls
            try:
                outcomes.append((job, self._finish(job), None))
            except Exception as err:
                outcomes.append((job, None, err))
            job.parts = []
        seconds = self._compute_seconds.get(batch.kind)
        if seconds is None:
            seconds = self._compute_seconds[batch.kind] = self._metrics.compute_seconds.labels(
                runtime.name, batch.kind
            )
        seconds.observe(time.perf_counter() - start)
        return outcomes

    def _finish_together(
        self,
        batch: _Batch,
        sizes: Sequence[int],
        outputs: Sequence[Any],
        raw: Mapping[str, Any],
    ) -> dict[int, tuple[Any, BaseException | None]]:
        """Finishes, in one go per post-processing, the requests that lie whole in
        this call: (result, error) by piece index. Split requests are left out:
        their rows are finished once all of them are back.

        One finish over the whole call (pad rows included — finishing is per
        sample, so they cannot affect real rows) replaces one small kernel launch
        and host copy per request, which dominated device time on small models.
        """
        if batch.kind != EXPLAIN:
            return {}
        groups: dict[Any, list[int]] = {}
        for k, piece in enumerate(batch.pieces):
            job = piece.job
            if piece.start == 0 and piece.stop == job.rows and not (job.failed or job.gone):
                groups.setdefault(_plan(piece).post, []).append(k)
        offsets = np.cumsum([0, *sizes])
        done: dict[int, tuple[Any, BaseException | None]] = {}
        for ks in groups.values():
            if len(ks) < 2:
                continue  # nothing to share: finished alone like a split request
            plans = [_plan(batch.pieces[k]) for k in ks]
            rows = [np.arange(offsets[k], offsets[k + 1]) for k in ks]
            ends = np.cumsum([len(r) for r in rows])
            spans = [(int(end - len(r)), int(end)) for r, end in zip(rows, ends, strict=True)]
            try:
                if len(ks) == len(batch.pieces):
                    # Every request of the call: finish all rows (pad rows too —
                    # finishing is per sample) and skip the gather.
                    results = self.runtime.finish_together(plans, spans, outputs, dict(raw))
                else:
                    # Only this group's rows, gathered on the device.
                    index = np.concatenate(rows)
                    results = self.runtime.finish_together(
                        plans,
                        spans,
                        self.runtime.gather_rows(outputs, index),
                        self.runtime.gather_rows(raw, index),
                    )
            except Exception as err:
                done.update({k: (None, err) for k in ks})
                continue
            done.update({k: (r, None) for k, r in zip(ks, results, strict=True)})
        return done

    def _finish(self, job: _Job) -> Any:
        runtime = self.runtime
        parts = job.parts
        outputs = [runtime.concat_rows([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
        if job.kind == PREDICT:
            return outputs
        raw = {name: runtime.concat_rows([p[1][name] for p in parts]) for name in parts[0][1]}
        return runtime.finish(_plan_of(job), outputs, raw)

    # Shutting down ----------------------------------------------------------------

    def flush(self) -> None:
        """Sends everything queued now without waiting for the delay."""
        self._flush_mark = time.monotonic()
        self._wakeup.set()

    def hurry(self) -> None:
        """From now on nothing waits for company: the runtime is being replaced (hot
        reload), so the requests still coming to it are the last ones.
        """
        self._flush_mark = math.inf
        self._wakeup.set()

    def drain(self) -> None:
        """Refuses new requests; what is queued goes to the device without waiting."""
        self._closing = True
        self._flush_mark = math.inf
        self._wakeup.set()
        if self._room is not None and not self._room.done():
            self._room.set_result(None)  # waiters for room find it shutting down

    async def aclose(self) -> None:
        """Drains the queue, waits for the last device call, then ends the thread."""
        self.drain()
        if self._task is not None:
            await self._task
        await asyncio.to_thread(self._device.shutdown, True)


def _lane_of(key: Key) -> int:
    """The lane of a key's requests (its second item)."""
    lane = key[1]
    assert isinstance(lane, int)
    return lane


def _plan_of(job: _Job) -> Plan:
    assert job.plan is not None  # explain jobs always carry their plan
    return job.plan


def _plan(piece: _Piece) -> Plan:
    return _plan_of(piece.job)
