"""A numpy device behind the seam (`salience_server.seam.ModelDevice`), for testing
the protocol layer — core, batcher, servicer — without TensorFlow, as MLServer
tests its data plane against a `SumModel`.

The model: one float32 input `x` of shape (N, 4); its output `sum` is each
sample's sum (N, 1); its one method, `vanilla`, has the gradient of
`scale · sum` with respect to `x`, which is `scale` everywhere: a request's
`objectives[0].weight` becomes its per-sample `scale` param, so a map says whose
params it was computed with. A sample whose first value is `POISON` makes any
device call holding it fail, as a model's op would on an input it cannot take.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from salience_server.errors import InvalidArgument, allowed
from salience_server.explain.options import (
    VANILLA,
    ExplainOptions,
    ExplainResult,
    Limits,
    ResolvedExplanation,
)
from salience_server.explain.plan import Graph, Plan, Post
from salience_server.model_config import ModelConfig
from salience_server.seam import LayerInfo, TensorInfo

POISON = -12345.0


class SumDevice:
    """A ModelDevice computed with numpy; it records what reached it."""

    has_layers = False
    platform = "keras"
    device = "numpy"

    def __init__(self, name: str = "sum", version: int = 1) -> None:
        self.name = name
        self.version = version
        self.config = ModelConfig()
        self.inputs = (TensorInfo("x", "float32", (None, 4)),)
        self.outputs = (TensorInfo("sum", "float32", (None, 1)),)
        self.layers: tuple[LayerInfo, ...] = ()
        self.calls: list[tuple[str, int]] = []  # (kind, rows) of every device call
        self.planned = 0  # plans made (not answered from the cache)
        self.threads: set[str] = set()  # threads the device calls ran on
        # Set to a cleared event, every device call waits for it (after it is recorded):
        # tests hold the device busy while they queue work behind the call.
        self.gate: threading.Event | None = None
        self._plans: dict[tuple[ExplainOptions, int], Plan] = {}

    # Metadata ---------------------------------------------------------------

    def supported_methods(self) -> tuple[str, ...]:
        return (VANILLA,)

    def backprop_modifiers(self) -> tuple[str, ...]:
        return ()

    def default_grad_modifier(self, options: ExplainOptions) -> str:
        options = self.config.explain.apply(options)
        return options.grad_modifiers[0] if options.grad_modifiers else "absolute"

    # Plan -------------------------------------------------------------------

    def check_options(self, options: ExplainOptions, limits: Limits) -> None:
        if options.method != VANILLA:
            raise InvalidArgument(
                f"explanation.method={options.method!r} cannot explain model {self.name!r}: "
                f"use one of {allowed(self.supported_methods())}"
            )

    def cached_plan(self, options: ExplainOptions, batch: int) -> Plan | None:
        return self._plans.get((options, batch))

    def plan(self, options: ExplainOptions, batch: int) -> Plan:
        self.planned += 1
        scale = np.full(batch, options.objectives[0].weight, np.float32)
        plan = Plan(
            graph=Graph(VANILLA),
            params={"scale": scale},
            post=Post(("absolute",), keepdims=False, normalize=False, output_dtype="float32"),
            resolved=ResolvedExplanation(
                method=VANILLA,
                objectives=(),
                grad_modifiers=("absolute",),
                keepdims=False,
                normalize=False,
                output_dtype="float32",
                input_name="x",
                channels_reduced=False,
                seed=None,
            ),
            batch=batch,
        )
        self._plans[(options, batch)] = plan
        return plan

    def warm_up(self, buckets: Sequence[int]) -> None:
        for size in buckets:
            self.predict([np.zeros((size, 4), np.float32)])

    # Submit -----------------------------------------------------------------

    def enter_device(self) -> None:
        pass

    def _call(self, kind: str, x: np.ndarray) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((kind, len(x)))
        if self.gate is not None:
            self.gate.wait()
        if (x[:, 0] == POISON).any():
            raise InvalidArgument(f"inputs do not fit model {self.name!r}: a poisoned sample")

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._call("predict", inputs[0])
        return [inputs[0].sum(axis=1, keepdims=True)]

    def compute(
        self, graph: Graph, inputs: Sequence[np.ndarray], params: Mapping[str, np.ndarray]
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        x = inputs[0]
        self._call("explain", x)
        grads = np.ones_like(x) * params["scale"][:, None]
        return [x.sum(axis=1, keepdims=True)], {"grads": grads}

    def finish(self, plan: Plan, outputs: Any, raw: Any) -> ExplainResult:
        return ExplainResult(
            outputs=[np.asarray(o) for o in outputs],
            maps={"absolute": np.abs(raw["grads"])},
            resolved=plan.resolved,
        )

    def finish_together(
        self, plans: Sequence[Plan], spans: Sequence[tuple[int, int]], outputs: Any, raw: Any
    ) -> list[ExplainResult]:
        whole = self.finish(plans[0], outputs, raw)
        return [
            ExplainResult(
                outputs=[o[start:stop] for o in whole.outputs],
                maps={k: m[start:stop] for k, m in whole.maps.items()},
                resolved=plan.resolved,
            )
            for plan, (start, stop) in zip(plans, spans, strict=True)
        ]

    def split_rows(self, tensor: Any, sizes: Sequence[int]) -> list[Any]:
        ends = np.cumsum(sizes)
        return [tensor[end - size : end] for size, end in zip(sizes, ends, strict=True)]

    def gather_rows(self, tensors: Any, index: np.ndarray) -> Any:
        if isinstance(tensors, Mapping):
            return {name: t[index] for name, t in tensors.items()}
        return [t[index] for t in tensors]

    def concat_rows(self, parts: Sequence[Any]) -> Any:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
