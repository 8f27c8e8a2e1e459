"""One loaded model version: its Keras model, its specs and its compiled functions.

Everything here is blocking TensorFlow work; the core runs it on worker threads,
never on the event loop. Compiled functions are traced once per graph-changing key
and reused across requests (the keras-vis per-call rebuild leaked memory and time).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, allowed
from salience_server.explain import backprop, modifiers
from salience_server.explain.engine import (
    DeviceFunction,
    Graph,
    Plan,
    RawTensors,
    Tensors,
    param_specs,
)
from salience_server.explain.methods import METHODS
from salience_server.explain.options import (
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    OUTPUT_DTYPES,
    ExplainOptions,
    ExplainResult,
    Limits,
)
from salience_server.explain.targets import TargetResolver, activation_name

log = logging.getLogger(__name__)

# Distinct graphs kept compiled per model; the least recently used is dropped
# beyond this, so requests naming ever new layers cannot grow memory without bound.
FUNCTION_CACHE_SIZE = 32


def _check_honoured(options: ExplainOptions, plan: Plan) -> None:
    """Refuses options the method did not apply (its echo lacks them), so that a
    request never silently gets a map computed without what it asked for.
    """
    method = options.method
    r = plan.resolved
    if options.backprop_modifier and not r.backprop_modifier:
        raise InvalidArgument(
            f"explanation.backprop_modifier={options.backprop_modifier!r} does not apply to "
            f"method {method!r}: leave it empty"
        )
    if options.wrt is not None and not r.wrt:
        raise InvalidArgument(
            f"explanation.wrt does not apply to method {method!r}: leave it unset"
        )
    if options.penultimate_layer is not None and not r.penultimate_layer:
        raise InvalidArgument(
            f"explanation.penultimate_layer does not apply to method {method!r}: it chooses "
            "the layer of the CAM methods; leave it unset"
        )


@contextmanager
def _device_errors(model: str) -> Iterator[None]:
    """A device that runs out of memory fails only this call, as RESOURCE_EXHAUSTED."""
    try:
        yield
    except tf.errors.ResourceExhaustedError:
        log.warning("model %s: device out of memory", model, exc_info=True)
        raise ResourceExhausted(
            f"device out of memory while computing model {model!r}: retry later or with "
            "fewer samples"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: name, numpy dtype name and shape (None = free)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class LayerInfo:
    name: str
    index: int
    kind: str
    output_shape: tuple[int | None, ...] | None
    activation: str


def _tensor_info(tensor: Any, name: str) -> TensorInfo:
    return TensorInfo(name=name, dtype=str(np.dtype(tensor.dtype)), shape=tuple(tensor.shape))


def _producer_name(tensor: Any, fallback: str) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else fallback


def _layer_info(index: int, layer: keras.layers.Layer) -> LayerInfo:
    try:
        out = layer.output
        shape = None if isinstance(out, list | tuple | dict) else tuple(out.shape)
    except (AttributeError, ValueError):
        shape = None
    return LayerInfo(
        name=layer.name,
        index=index,
        kind=layer.__class__.__name__,
        output_shape=shape,
        activation=activation_name(layer),
    )


class ModelRuntime:
    """A Keras model ready to predict and explain."""

    def __init__(self, name: str, version: int, model: keras.Model, path: Path | None = None):
        self.name = name
        self.version = version
        self.path = path
        self.model = model
        if not getattr(model, "inputs", None):
            raise FailedPrecondition(
                f"model {name!r} version {version} has no functional graph (subclassed models "
                "are not supported): save it as a Functional or Sequential model"
            )
        self.inputs = tuple(
            _tensor_info(t, getattr(t, "name", "") or f"input_{i}")
            for i, t in enumerate(model.inputs)
        )
        self.outputs = tuple(
            _tensor_info(t, _producer_name(t, f"output_{i}")) for i, t in enumerate(model.outputs)
        )
        self.layers = tuple(_layer_info(i, layer) for i, layer in enumerate(model.layers))
        self.input_specs = tuple(
            tf.TensorSpec([None, *info.shape[1:]], info.dtype, name=f"input_{i}")
            for i, info in enumerate(self.inputs)
        )
        self._predict = tf.function(self._forward, input_signature=[self.input_specs])
        self.resolver = TargetResolver(model)
        self._functions: OrderedDict[Graph, DeviceFunction] = OrderedDict()
        # Guards the resolver and the function cache; RLock because methods build
        # derived models (linear twins, modified copies) while planning.
        self._lock = threading.RLock()
        # Models and facts derived from this one (backprop-modified copies, activation
        # scans), built once under _lock by the methods that need them, by key.
        self.derived: dict[Any, Any] = {}
        self.traces = 0  # how many gradient functions have been traced (for tests)

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> ModelRuntime:
        """Loads `model.keras` in safe mode: a model file can never run arbitrary code."""
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        return cls(name, version, model, path)

    def _forward(self, inputs: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        out = self.model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return tuple(out) if isinstance(out, list | tuple) else (out,)

    # Inputs -----------------------------------------------------------------

    def check_inputs(self, arrays: dict[str, np.ndarray], max_batch: int) -> list[np.ndarray]:
        """Orders request inputs by the model's inputs and checks each against its spec.

        Keys are input names; a single unnamed ("") input is accepted for a model
        with one input. Raises InvalidArgument naming the field and what is allowed.
        """
        names = [info.name for info in self.inputs]
        if len(self.inputs) == 1 and set(arrays) == {""}:
            arrays = {names[0]: arrays[""]}
        unknown = sorted(set(arrays) - set(names))
        if unknown:
            raise InvalidArgument(
                f"inputs name {allowed(unknown)} not an input of model {self.name!r}: "
                f"its inputs are {allowed(names)}"
            )
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InvalidArgument(
                f"inputs lack {allowed(missing)}: model {self.name!r} takes {allowed(names)}"
            )
        ordered = []
        batch = None
        for info in self.inputs:
            array = arrays[info.name]
            field = f"inputs[{info.name!r}]"
            expected = ["N", *(d if d is not None else "any" for d in info.shape[1:])]
            if array.dtype != np.dtype(info.dtype):
                raise InvalidArgument(
                    f"{field}.dtype={array.dtype} is not accepted: input {info.name!r} of model "
                    f"{self.name!r} takes {info.dtype}"
                )
            if array.ndim != len(info.shape):
                raise InvalidArgument(
                    f"{field}.shape={list(array.shape)} has rank {array.ndim}: input "
                    f"{info.name!r} takes rank {len(info.shape)} (batch first), shape {expected}"
                )
            for axis, (got, want) in enumerate(zip(array.shape[1:], info.shape[1:], strict=True)):
                if want is not None and got != want:
                    raise InvalidArgument(
                        f"{field}.shape[{axis + 1}]={got} does not match: input {info.name!r} "
                        f"takes shape {expected}"
                    )
            if array.shape[0] == 0:
                raise InvalidArgument(f"{field} is an empty batch: send at least one sample")
            if array.shape[0] > max_batch:
                raise InvalidArgument(
                    f"{field} has a batch of {array.shape[0]}, over the server's "
                    f"max_batch_size={max_batch}: split it into smaller requests"
                )
            if batch is not None and array.shape[0] != batch:
                raise InvalidArgument(
                    f"{field} has batch {array.shape[0]} but an earlier input has {batch}: "
                    "every input needs the same batch size"
                )
            batch = array.shape[0]
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int(np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)))[0][0])
                raise InvalidArgument(
                    f"{field} holds NaN or infinite values (first in sample {bad}): "
                    "only finite values are accepted"
                )
            ordered.append(array)
        return ordered

    # Predict ----------------------------------------------------------------

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for checked inputs."""
        with _device_errors(self.name):
            outputs = self._predict(tuple(tf.convert_to_tensor(x) for x in inputs))
            return [o.numpy() for o in outputs]

    # Explain ----------------------------------------------------------------

    def check_options(self, options: ExplainOptions, limits: Limits) -> None:
        """Rejects options no model could honour, before any work is queued."""
        if options.method not in METHODS:
            raise InvalidArgument(
                f"explanation.method={options.method!r} is unknown: use one of {allowed(METHODS)}"
            )
        backprop.check_name(options)
        seen: set[str] = set()
        for k, name in enumerate(options.grad_modifiers):
            if name not in modifiers.GRAD_MODIFIERS:
                raise InvalidArgument(
                    f"explanation.grad_modifiers[{k}]={name!r} is unknown: "
                    f"use one of {allowed(modifiers.GRAD_MODIFIERS)}"
                )
            if name in seen:
                raise InvalidArgument(
                    f"explanation.grad_modifiers[{k}]={name!r} is listed twice: list each once"
                )
            seen.add(name)
        if options.output_dtype not in OUTPUT_DTYPES:
            raise InvalidArgument(
                f"explanation.output_dtype={options.output_dtype} is not supported for maps: "
                f"use one of {allowed(OUTPUT_DTYPES)}"
            )
        if options.output_dtype == "uint8" and not options.normalize:
            raise InvalidArgument(
                "explanation.output_dtype=uint8 needs normalize=true: raw gradients do not fit "
                "in 0..255; use float32 or float16 for raw maps"
            )
        if len(options.objectives) > limits.max_objectives:
            raise InvalidArgument(
                f"explanation.objectives has {len(options.objectives)} entries, over the "
                f"server's max_objectives={limits.max_objectives}"
            )
        for k, objective in enumerate(options.objectives):
            if not np.isfinite(objective.weight):
                raise InvalidArgument(
                    f"explanation.objectives[{k}].weight={objective.weight} is not finite"
                )
        if options.samples > limits.max_samples:
            raise InvalidArgument(
                f"explanation.samples={options.samples} is over the server's "
                f"max_samples={limits.max_samples}: use 1..{limits.max_samples} (0 for the "
                f"default, {DEFAULT_SAMPLES})"
            )
        if options.steps > limits.max_steps:
            raise InvalidArgument(
                f"explanation.steps={options.steps} is over the server's "
                f"max_steps={limits.max_steps}: use 1..{limits.max_steps} (0 for the "
                f"default, {DEFAULT_STEPS})"
            )
        names = [info.name for info in self.inputs]
        if options.input_name and options.input_name not in names:
            raise InvalidArgument(
                f"explanation.input={options.input_name!r} is not an input of model "
                f"{self.name!r}: choose one of {allowed(names)}"
            )
        if len(names) > 1 and not options.input_name:
            raise InvalidArgument(
                f"explanation.input is required: model {self.name!r} has inputs {allowed(names)}"
            )

    def plan(self, options: ExplainOptions, batch: int) -> Plan:
        """Resolves checked options for a request of `batch` samples (engine step 1)."""
        method = METHODS[options.method]
        with self._lock:
            plan = method.plan(self, options, batch)
        _check_honoured(options, plan)
        return plan

    def compute(
        self, graph: Graph, inputs: Sequence[np.ndarray], params: Mapping[str, np.ndarray]
    ) -> tuple[Tensors, RawTensors]:
        """One device call of one graph on a (possibly merged) batch (engine step 2)."""
        fn = self._device_function(graph, params)
        with _device_errors(self.name):
            return fn(
                tuple(tf.convert_to_tensor(x) for x in inputs),
                {key: tf.convert_to_tensor(value) for key, value in params.items()},
            )

    def finish(self, plan: Plan, outputs: Sequence[tf.Tensor], raw: RawTensors) -> ExplainResult:
        """A request's result from its own rows of a device call (engine step 3)."""
        with _device_errors(self.name):
            maps, extras = METHODS[plan.graph.method].finish(plan, raw)
            return ExplainResult(
                outputs=[np.asarray(o) for o in outputs],
                maps={name: m.numpy() for name, m in maps.items()},
                resolved=plan.resolved,
                extras={name: e.numpy() for name, e in extras.items()},
            )

    def finish_together(
        self,
        plans: Sequence[Plan],
        spans: Sequence[tuple[int, int]],
        outputs: Sequence[tf.Tensor],
        raw: RawTensors,
    ) -> list[ExplainResult]:
        """Results of several requests of one device call that share their graph and
        post-processing: one finish over every row of the call, one copy to the host,
        then each request's rows by `spans` (start, stop).

        Finishing is per sample (per-sample modifiers, reductions and
        normalisation), so this equals finishing each request alone; it replaces a
        per-request kernel launch and host copy with one for the whole group.
        """
        first = plans[0]
        with _device_errors(self.name):
            maps, extras = METHODS[first.graph.method].finish(first, raw)
            host_maps = {name: m.numpy() for name, m in maps.items()}
            host_extras = {name: e.numpy() for name, e in extras.items()}
            host_outputs = [np.asarray(o) for o in outputs]
        return [
            ExplainResult(
                outputs=[o[start:stop] for o in host_outputs],
                maps={name: m[start:stop] for name, m in host_maps.items()},
                resolved=plan.resolved,
                extras={name: e[start:stop] for name, e in host_extras.items()},
            )
            for plan, (start, stop) in zip(plans, spans, strict=True)
        ]

    # Batches (the batcher's row bookkeeping; tensors stay on the device) -----

    @staticmethod
    def gather_rows(tensors: Any, index: np.ndarray) -> Any:
        """The rows `index` of each batch-first tensor of a sequence or mapping."""
        if isinstance(tensors, Mapping):
            return {name: tf.gather(t, index) for name, t in tensors.items()}
        return [
            np.asarray(t)[index] if isinstance(t, np.ndarray) else tf.gather(t, index)
            for t in tensors
        ]

    @staticmethod
    def split_rows(tensor: Any, sizes: Sequence[int]) -> list[Any]:
        """Consecutive blocks of `sizes` rows of a batch-first device tensor or array."""
        if len(sizes) == 1:
            return [tensor]
        if isinstance(tensor, np.ndarray):
            ends = np.cumsum(sizes)
            return [tensor[end - size : end] for size, end in zip(sizes, ends, strict=True)]
        return list(tf.split(tensor, list(sizes), axis=0))

    @staticmethod
    def concat_rows(parts: Sequence[Any]) -> Any:
        """Row blocks (of one request split across device calls) joined back in order."""
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        return tf.concat(list(parts), axis=0)

    def explain(self, inputs: Sequence[np.ndarray], options: ExplainOptions) -> ExplainResult:
        """Predictions and one map per grad modifier, for one request computed alone."""
        plan = self.plan(options, len(inputs[0]))
        outputs, raw = self.compute(plan.graph, inputs, plan.params)
        return self.finish(plan, outputs, raw)

    def _device_function(self, graph: Graph, params: Mapping[str, np.ndarray]) -> DeviceFunction:
        with self._lock:
            fn = self._functions.get(graph)
            if fn is not None:
                self._functions.move_to_end(graph)
                return fn
            fn = METHODS[graph.method].build(self, graph, param_specs(params))
            self._functions[graph] = fn
            if len(self._functions) > FUNCTION_CACHE_SIZE:
                self._functions.popitem(last=False)
            return fn

    def supported_methods(self) -> tuple[str, ...]:
        """The methods this model can be explained with."""
        return tuple(name for name, method in METHODS.items() if method.supported(self) is None)

    def backprop_modifiers(self) -> tuple[str, ...]:
        """The backprop modifiers this model can be explained with."""
        return backprop.supported_modifiers(self)

    def count_trace(self) -> None:
        """Called by device functions while they are traced (tests count retraces)."""
        self.traces += 1

    def warm_up(self) -> None:
        """Traces predict and the default explanation, so the first request is not slow."""
        sample = [
            np.zeros([1, *(d or 1 for d in info.shape[1:])], dtype=info.dtype)
            for info in self.inputs
        ]
        self.predict(sample)
        if len(self.inputs) == 1 and np.dtype(self.inputs[0].dtype).kind == "f":
            self.explain(sample, ExplainOptions())
