"""The device seam: everything the protocol layer knows of a model, and the few
calls it makes to the device. Nothing here, and nothing that uses only this,
imports TensorFlow.

    servicers, stream, OIP ─┐
    convert (protobuf ⇄ numpy)├─> InferenceCore ─> Batcher ══ seam ══> ModelRuntime
    checks (inputs, numpy)  ─┘    (admission,     (queue, batch   (TensorFlow:
                                   leases)          assembly)       plan, compute,
                                                                    finish)

Above the seam (`core`, `batching`, `servicer`, `stream`, `oip`, `convert`,
`checks`) a model is a `ModelDevice`: pure data that describes it (`TensorInfo`,
`LayerInfo`, its configuration) and five calls:

- **metadata**: the descriptive attributes, `supported_methods()`,
  `backprop_modifiers()`, `default_grad_modifier(options)` (the map a request
  that names no grad modifier gets, as this model resolves it), and the
  server-wide `Catalog` of names;
- **plan**: `check_options` then `plan(options, rows)` turns checked options into
  a `Plan` (pure data: a hashable `Graph`, per-sample numpy params, `Post`);
  `cached_plan` answers options planned before without a lock, on the event loop;
- **submit**: `predict(inputs)` or `compute(graph, inputs, params)` then `finish` /
  `finish_together`, on one merged batch, from the model's device thread;
- **cancel**: is the batcher's, above the seam: a request whose caller left never
  reaches `compute`.

Every argument and result of these calls is numpy arrays and frozen dataclasses,
so that each call could be a shared-memory handoff to another process; the
tensors between `compute` and `finish` stay on the device side (opaque here), and
the row helpers (`split_rows`, `gather_rows`, `concat_rows`) keep them there.
Unit tests drive the core, the batcher and the servicer through this protocol
against a numpy fake device (tests/unit/server/fake_device.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from salience_server.explain.options import ExplainOptions, ExplainResult, Limits
    from salience_server.explain.plan import Graph, Plan
    from salience_server.model_config import ModelConfig


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: name, numpy dtype name and shape (None = free)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a model, as metadata lists it."""

    name: str
    index: int
    kind: str
    output_shape: tuple[int | None, ...] | None
    activation: str


@dataclass(frozen=True)
class Catalog:
    """The names the server offers, whatever the model: explanation methods and
    grad modifiers (plugins may add to both at start-up, before this is taken).
    """

    methods: tuple[str, ...]
    grad_modifiers: tuple[str, ...]


class ModelDevice(Protocol):
    """One loaded model version, as the protocol layer sees it."""

    name: str
    version: int
    config: ModelConfig
    inputs: tuple[TensorInfo, ...]  # as requests send them (before preprocessing)
    outputs: tuple[TensorInfo, ...]
    layers: tuple[LayerInfo, ...]
    has_layers: bool
    platform: str  # "keras" or "tensorflow_savedmodel"
    device: str  # where the weights are, as the framework names it

    # Metadata ------------------------------------------------------------------

    def supported_methods(self) -> tuple[str, ...]: ...

    def backprop_modifiers(self) -> tuple[str, ...]: ...

    def default_grad_modifier(self, options: ExplainOptions) -> str: ...

    # Plan ----------------------------------------------------------------------

    def check_options(self, options: ExplainOptions, limits: Limits) -> None: ...

    def cached_plan(self, options: ExplainOptions, batch: int) -> Plan | None: ...

    def plan(self, options: ExplainOptions, batch: int) -> Plan: ...

    def warm_up(self, buckets: Sequence[int]) -> None: ...

    # Submit (on the model's device thread) ---------------------------------------

    def enter_device(self) -> None: ...

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def compute(
        self, graph: Graph, inputs: Sequence[np.ndarray], params: Mapping[str, np.ndarray]
    ) -> tuple[Any, Any]: ...

    def finish(self, plan: Plan, outputs: Any, raw: Any) -> ExplainResult: ...

    def finish_together(
        self,
        plans: Sequence[Plan],
        spans: Sequence[tuple[int, int]],
        outputs: Any,
        raw: Any,
    ) -> list[ExplainResult]: ...

    def split_rows(self, tensor: Any, sizes: Sequence[int]) -> list[Any]: ...

    def gather_rows(self, tensors: Any, index: np.ndarray) -> Any: ...

    def concat_rows(self, parts: Sequence[Any]) -> Any: ...
