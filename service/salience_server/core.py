"""The protocol-neutral core: checks and plans a request off the event loop, then
hands it to its model's batcher, which computes it on the model's device thread.

The servicer converts protobuf to these calls and back; nothing here knows gRPC.
A deadline is an absolute `time.monotonic()` instant (None: no deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from salience_server.batching import Batcher
from salience_server.explain.engine import Plan
from salience_server.explain.options import ExplainOptions, ExplainResult
from salience_server.metrics import Metrics
from salience_server.repository import ModelRepository
from salience_server.runtime import ModelRuntime
from salience_server.settings import Settings

T = TypeVar("T")


def _rows(arrays: dict[str, np.ndarray]) -> int:
    """The batch a request claims, before its inputs are checked (for admission)."""
    return max((a.shape[0] if a.ndim else 1 for a in arrays.values()), default=1)


class InferenceCore:
    """Predict and explain on the models of one repository."""

    def __init__(self, repository: ModelRepository, settings: Settings, metrics: Metrics) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        # Host work only (input checks, planning, which may build derived models):
        # device calls run on each model's own thread, inside its batcher.
        self._host = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="salience-host"
        )
        self._batchers: dict[tuple[str, int], Batcher] = {}

    @property
    def batchers(self) -> Mapping[tuple[str, int], Batcher]:
        """The batchers made so far, by model name and version."""
        return MappingProxyType(self._batchers)

    def batcher(self, runtime: ModelRuntime) -> Batcher:
        """The batcher of a model version, made on first use (on the event loop)."""
        key = (runtime.name, runtime.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            config = self.settings.batching_for(runtime.name)
            batcher = self._batchers[key] = Batcher(runtime, config, self.metrics)
        return batcher

    async def _on_host(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._host, work)

    async def predict(
        self,
        name: str,
        version: int,
        arrays: dict[str, np.ndarray],
        deadline: float | None = None,
    ) -> tuple[ModelRuntime, list[np.ndarray]]:
        """The model's outputs for a batch of inputs keyed by input name."""
        runtime = self.repository.get(name, version)
        batcher = self.batcher(runtime)
        # A full queue refuses before any work is spent on the request.
        batcher.admit(_rows(arrays), deadline)
        inputs = await self._on_host(
            lambda: runtime.check_inputs(arrays, self.settings.max_batch_size)
        )
        return runtime, await batcher.predict(inputs, deadline)

    async def explain(
        self,
        name: str,
        version: int,
        arrays: dict[str, np.ndarray],
        options: ExplainOptions,
        deadline: float | None = None,
    ) -> tuple[ModelRuntime, ExplainResult]:
        """Predictions and maps for a batch of inputs keyed by input name."""
        runtime = self.repository.get(name, version)
        runtime.check_options(options, self.settings.limits)
        batcher = self.batcher(runtime)
        batcher.admit(_rows(arrays), deadline)

        def prepare() -> tuple[list[np.ndarray], Plan]:
            inputs = runtime.check_inputs(arrays, self.settings.max_batch_size)
            return inputs, runtime.plan(options, len(inputs[0]))

        inputs, plan = await self._on_host(prepare)
        return runtime, await batcher.explain(inputs, plan, deadline)

    def drain(self) -> None:
        """Shutdown has begun: queued requests go to the device without waiting for
        company, and new ones are refused.
        """
        for batcher in self._batchers.values():
            batcher.drain()

    async def aclose(self) -> None:
        """Finishes what is queued, stops the threads, then releases the models."""
        for batcher in self._batchers.values():
            await batcher.aclose()
        await asyncio.to_thread(self._host.shutdown, True)
        self.repository.close()
