"""The protocol-neutral core: checks a request against its model and runs it on a
worker thread, off the event loop.

The servicer converts protobuf to these calls and back; nothing here knows gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from salience_server.explain.options import ExplainOptions, ExplainResult
from salience_server.metrics import Metrics
from salience_server.repository import ModelRepository
from salience_server.runtime import ModelRuntime
from salience_server.settings import Settings

T = TypeVar("T")


class InferenceCore:
    """Predict and explain on the models of one repository."""

    def __init__(self, repository: ModelRepository, settings: Settings, metrics: Metrics) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="salience-tf"
        )

    async def _run(self, runtime: ModelRuntime, kind: str, work: Callable[[], T]) -> T:
        def timed() -> T:
            start = time.perf_counter()
            try:
                return work()
            finally:
                self.metrics.compute_seconds.labels(runtime.name, kind).observe(
                    time.perf_counter() - start
                )

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    async def predict(
        self, name: str, version: int, arrays: dict[str, np.ndarray]
    ) -> tuple[ModelRuntime, list[np.ndarray]]:
        """The model's outputs for a batch of inputs keyed by input name."""
        runtime = self.repository.get(name, version)

        def work() -> list[np.ndarray]:
            inputs = runtime.check_inputs(arrays, self.settings.max_batch_size)
            outputs = runtime.predict(inputs)
            self.metrics.samples.labels(runtime.name, "predict").inc(len(inputs[0]))
            return outputs

        return runtime, await self._run(runtime, "predict", work)

    async def explain(
        self, name: str, version: int, arrays: dict[str, np.ndarray], options: ExplainOptions
    ) -> tuple[ModelRuntime, ExplainResult]:
        """Predictions and maps for a batch of inputs keyed by input name."""
        runtime = self.repository.get(name, version)
        runtime.check_options(options, self.settings.limits)

        def work() -> ExplainResult:
            inputs = runtime.check_inputs(arrays, self.settings.max_batch_size)
            result = runtime.explain(inputs, options)
            self.metrics.samples.labels(runtime.name, "explain").inc(len(inputs[0]))
            return result

        return runtime, await self._run(runtime, "explain", work)

    def close(self) -> None:
        """Waits for running work, then releases the models."""
        self._executor.shutdown(wait=True)
        self.repository.close()
