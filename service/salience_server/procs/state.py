"""What a front end knows of the device owner's models: a `RemoteModel` per loaded
version (the descriptive side of the seam's `ModelDevice`, as plain data) and the
`State` the owner pushes (readiness, the repository's versions, health).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from salience_server.explain import catalog
from salience_server.readiness import Readiness
from salience_server.repository import LoadFailure, ModelRepository
from salience_server.seam import LayerInfo, ModelDevice, TensorInfo

if TYPE_CHECKING:
    from salience_server.explain.options import ExplainOptions, ExplainResult, Limits
    from salience_server.explain.plan import Graph, Plan
    from salience_server.model_config import ModelConfig


@dataclass(eq=False)
class RemoteModel:
    """A model version the device owner serves, as a front end sees it: everything
    the protocol layer reads. Its device calls happen on the owner, so they are
    not here; its options are checked there too, with every request.
    """

    serial: int  # the owner's number for this runtime (a reload makes a new one)
    name: str
    version: int
    config: ModelConfig
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layers: tuple[LayerInfo, ...]
    has_layers: bool
    platform: str
    device: str
    methods: tuple[str, ...]
    modifiers: tuple[str, ...]

    def supported_methods(self) -> tuple[str, ...]:
        return self.methods

    def backprop_modifiers(self) -> tuple[str, ...]:
        return self.modifiers

    def check_options(self, options: ExplainOptions, limits: Limits) -> None:
        """Checked by the owner with the request (the same check, the same errors)."""

    def default_grad_modifier(self, options: ExplainOptions) -> str:
        """As the owner's runtime answers it: the model's configured default, else the
        method's ("" for a method that is not known).
        """
        options = self.config.explain.apply(options)
        if options.grad_modifiers:
            return options.grad_modifiers[0]
        return catalog.METHODS.get(options.method, "")

    # The device side of the seam runs on the owner only.

    def cached_plan(self, options: ExplainOptions, batch: int) -> Plan | None:
        return None

    def plan(self, options: ExplainOptions, batch: int) -> Plan:
        raise RuntimeError("plans are made by the device owner")

    def warm_up(self, buckets: Sequence[int]) -> None:
        raise RuntimeError("models are warmed up by the device owner")

    def enter_device(self) -> None:
        raise RuntimeError("device calls run on the device owner")

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("device calls run on the device owner")

    def compute(
        self, graph: Graph, inputs: Sequence[np.ndarray], params: Mapping[str, np.ndarray]
    ) -> tuple[Any, Any]:
        raise RuntimeError("device calls run on the device owner")

    def finish(self, plan: Plan, outputs: Any, raw: Any) -> ExplainResult:
        raise RuntimeError("device calls run on the device owner")

    def finish_together(
        self,
        plans: Sequence[Plan],
        spans: Sequence[tuple[int, int]],
        outputs: Any,
        raw: Any,
    ) -> list[ExplainResult]:
        raise RuntimeError("device calls run on the device owner")

    def split_rows(self, tensor: Any, sizes: Sequence[int]) -> list[Any]:
        raise RuntimeError("device calls run on the device owner")

    def gather_rows(self, tensors: Any, index: np.ndarray) -> Any:
        raise RuntimeError("device calls run on the device owner")

    def concat_rows(self, parts: Sequence[Any]) -> Any:
        raise RuntimeError("device calls run on the device owner")


def describe(runtime: ModelDevice, serial: int) -> RemoteModel:
    """The descriptor of one of the owner's runtimes."""
    return RemoteModel(
        serial=serial,
        name=runtime.name,
        version=runtime.version,
        config=runtime.config,
        inputs=tuple(runtime.inputs),
        outputs=tuple(runtime.outputs),
        layers=tuple(runtime.layers),
        has_layers=runtime.has_layers,
        platform=runtime.platform,
        device=runtime.device,
        methods=tuple(runtime.supported_methods()),
        modifiers=tuple(runtime.backprop_modifiers()),
    )


@dataclass(frozen=True)
class State:
    """The owner's serving state, as front ends mirror it."""

    models: dict[str, dict[int, int]]  # name -> version -> descriptor serial
    failures: tuple[LoadFailure, ...]
    loading: frozenset[tuple[str, int]]
    unloading: tuple[tuple[str, int], ...]
    states: dict[str, str]  # the core's readiness by model (`Readiness.snapshot`)
    reasons: dict[str, str]  # why a failed model failed
    health: dict[str, int]  # health status by service name
    shut: bool  # health entered graceful shutdown
    serving: bool
    stopping: bool
    grad_modifiers: tuple[str, ...]


@dataclass(frozen=True)
class _Unloading:
    name: str
    version: int


def mirror(state: State, models: Mapping[int, RemoteModel]) -> ModelRepository:
    """A repository over descriptors that answers `get`, `versions`, `statuses` and
    `known` exactly as the owner's does.
    """
    served = {
        name: {v: models[serial] for v, serial in versions.items()}
        for name, versions in state.models.items()
    }
    repository = ModelRepository(cast(Any, served), state.failures)
    repository._loading = set(state.loading)
    repository._unloading = cast(Any, [_Unloading(n, v) for n, v in state.unloading])
    return repository


def readiness(state: State) -> Readiness:
    """The owner's readiness, to be read through the same view as the owner's."""
    return Readiness(state.states, state.reasons)
