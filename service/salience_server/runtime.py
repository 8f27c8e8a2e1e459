"""One loaded model version: its Keras model, its specs and its compiled functions.

Everything here is blocking TensorFlow work; the core runs it on worker threads,
never on the event loop. Compiled functions are traced once per graph-changing key
and reused across requests (the keras-vis per-call rebuild leaked memory and time).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import keras
import numpy as np
import tensorflow as tf

from salience_server import checks, devices, rows, warmup
from salience_server.devices import Placement
from salience_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    allowed,
)
from salience_server.explain import backprop, modifiers, randomize
from salience_server.explain.engine import DeviceFunction, RawTensors, Tensors, param_specs
from salience_server.explain.methods import METHODS, occlusion
from salience_server.explain.options import (
    BLUR_IG,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    GUIDED_IG,
    OCCLUSION,
    OUTPUT_DTYPES,
    XRAI,
    ExplainOptions,
    ExplainResult,
    Limits,
)
from salience_server.explain.plan import Graph, Plan
from salience_server.explain.targets import Target, TargetResolver, activation_name
from salience_server.model_config import ModelConfig
from salience_server.preprocess import Preprocessing, WireCast
from salience_server.seam import LayerInfo, TensorInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

# Plans kept per model, by (options, batch size), so that a request like an
# earlier one is planned on the event loop without a lock or a thread hop; only
# plans whose per-sample params are small are kept (an Integrated Gradients
# baseline is input-sized).
PLAN_CACHE_SIZE = 256
PLAN_CACHE_BYTES = 1 << 20

# Distinct graphs kept compiled per model; the least recently used is dropped
# beyond this, so requests naming ever new layers cannot grow memory without bound.
FUNCTION_CACHE_SIZE = 32


# The path methods' own parameters, by the method that takes them.
_PATH_PARAMETERS: dict[str, str] = {
    "blur_max_sigma": BLUR_IG,
    "blur_grad_step": BLUR_IG,
    "guided_fraction": GUIDED_IG,
    "guided_max_dist": GUIDED_IG,
    "xrai_scales": XRAI,
    "xrai_sigma": XRAI,
    "xrai_min_size": XRAI,
    "xrai_dilation_radius": XRAI,
    "xrai_area_threshold": XRAI,
}


def _check_honoured(options: ExplainOptions, plan: Plan) -> None:
    """Refuses options the method did not apply (its echo lacks them), so that a
    request never silently gets a map computed without what it asked for.
    """
    method = options.method
    for field, owner in _PATH_PARAMETERS.items():
        if getattr(options, field) not in (None, ()) and method != owner:
            raise InvalidArgument(
                f"explanation.{field} does not apply to method {method!r}: it is a parameter "
                f"of method {owner!r}; leave it unset"
            )
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
    unused = [
        name
        for name, asked, echoed in (
            ("chunk_size", options.chunk_size, r.chunk_size),
            ("top_channels", options.top_channels, r.top_channels),
            ("window", options.window, r.window),
            ("stride", options.stride, r.stride),
            ("occlusion_value", options.occlusion_value is not None, r.window),
        )
        if asked and not echoed
    ]
    if unused:
        raise InvalidArgument(
            f"explanation.{unused[0]} does not apply to method {method!r}: leave it unset"
        )
    if options.penultimate_layer is not None and not r.penultimate_layer:
        raise InvalidArgument(
            f"explanation.penultimate_layer does not apply to method {method!r}: it chooses "
            "the layer of the CAM methods; leave it unset"
        )


def _op_reason(err: tf.errors.OpError) -> str:
    """The failing op's own words, without TensorFlow's trace of where its node was
    defined (the last line that is neither a node reference nor a frame).
    """
    lines = [line.strip() for line in err.message.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("[[", "File ", "Detected at"))]
    return reasons[-1] if reasons else type(err).__name__


@contextmanager
def _device_errors(model: str) -> Iterator[None]:
    """A device that runs out of memory fails only this call, as RESOURCE_EXHAUSTED;
    inputs that pass every check but that the model's layers cannot compute (free
    axes too small for a convolution, a value the model asserts against) fail it as
    INVALID_ARGUMENT.
    """
    try:
        yield
    except tf.errors.ResourceExhaustedError:
        log.warning("model %s: device out of memory", model, exc_info=True)
        raise ResourceExhausted(
            f"device out of memory while computing model {model!r}: retry later or with "
            "fewer samples"
        ) from None
    except tf.errors.InvalidArgumentError as err:
        reason = _op_reason(err)
        # The caller's fault, answered in full: no traceback for every such request.
        log.info("model %s: inputs its layers cannot compute: %s", model, reason)
        raise InvalidArgument(
            f"inputs do not fit model {model!r}: its layers fail on them ({reason}); "
            "send inputs the model accepts (GetModelMetadata lists their shapes)"
        ) from None


def _with_xla(fn: DeviceFunction) -> DeviceFunction:
    """The same device function compiled by XLA: the methods build plain
    `tf.function`s; this re-wraps the Python function with `jit_compile=True` (the
    unwrapped one is never traced).
    """
    python_function = getattr(fn, "python_function", None)
    signature = getattr(fn, "input_signature", None)
    if python_function is None:
        return fn
    compiled: DeviceFunction = tf.function(
        python_function, input_signature=signature, jit_compile=True
    )
    return compiled


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

    # Whether the model has Keras layers that objectives, `wrt`, the CAM methods and
    # backprop modifiers can name; a SavedModel's signature has none (savedmodel.py).
    has_layers = True
    platform = "keras"

    def __init__(
        self,
        name: str,
        version: int,
        model: keras.Model,
        path: Path | None = None,
        config: ModelConfig | None = None,
        placement: Placement | None = None,
    ):
        self.model = model
        if not getattr(model, "inputs", None):
            raise FailedPrecondition(
                f"model {name!r} version {version} has no functional graph (subclassed models "
                "are not supported): save it as a Functional or Sequential model"
            )
        placement = placement or devices.current()
        if placement.policy is not None:
            # Before anything reads the layers: derived models copy their policies.
            switched = devices.apply_mixed_precision(model, placement.policy)
            log.info("model %s: %d layers compute in %s", name, switched, placement.compute_dtype)
        self._setup(
            name,
            version,
            path,
            config,
            inputs=tuple(
                _tensor_info(t, getattr(t, "name", "") or f"input_{i}")
                for i, t in enumerate(model.inputs)
            ),
            outputs=tuple(
                _tensor_info(t, _producer_name(t, f"output_{i}"))
                for i, t in enumerate(model.outputs)
            ),
            layers=tuple(_layer_info(i, layer) for i, layer in enumerate(model.layers)),
            resolver=TargetResolver(model),
            placement=placement,
        )

    def _setup(
        self,
        name: str,
        version: int,
        path: Path | None,
        config: ModelConfig | None,
        *,
        inputs: tuple[TensorInfo, ...],
        outputs: tuple[TensorInfo, ...],
        layers: tuple[LayerInfo, ...],
        resolver: TargetResolver,
        placement: Placement | None = None,
    ) -> None:
        """The state of every runtime, whatever the format of its model.

        `placement` (default: `devices.current()`, the loading server's) is where its
        weights were created and every compiled call of it runs.
        """
        self.placement = placement or devices.current()
        self.name = name
        self.version = version
        self.path = path
        self.config = config or ModelConfig()
        # Requests send inputs as they are before the preprocessing (a resized input
        # takes any height and width); ModelConfigError when it does not fit the model.
        self.preprocessing = Preprocessing(self.config.preprocess, inputs)
        self.inputs = self.preprocessing.sender_inputs
        self.outputs = outputs
        self.layers = layers
        self.input_specs = tuple(
            tf.TensorSpec([None, *info.shape[1:]], info.dtype, name=f"input_{i}")
            for i, info in enumerate(self.inputs)
        )
        self._predict = tf.function(
            self._forward,
            input_signature=[self.input_specs],
            jit_compile=self.placement.jit_compile,
        )
        # Dtypes inputs accept on the wire besides the model's ([inputs.<name>]): the
        # compiled functions of those dtypes cast on the device, then call the
        # model's own (`_wire_predict`, `_wire_function`).
        self.wire = WireCast(self.config, self.inputs)
        self._wire_predicts: dict[tuple[str, ...], Any] = {}
        self._wire_functions: OrderedDict[
            tuple[Graph, tuple[str, ...]], tuple[DeviceFunction, DeviceFunction]
        ] = OrderedDict()
        self.resolver = resolver
        self._functions: OrderedDict[Graph, DeviceFunction] = OrderedDict()
        # (options, batch) -> (plan, options with the model's defaults applied).
        self._plans: dict[tuple[ExplainOptions, int], tuple[Plan, ExplainOptions]] = {}
        # Guards the resolver and the function cache; RLock because methods build
        # derived models (linear twins, modified copies) while planning.
        self._lock = threading.RLock()
        # Models and facts derived from this one (backprop-modified copies, activation
        # scans), built once under _lock by the methods that need them (`derive`).
        self._derived: dict[Any, Any] = {}
        self.traces = 0  # how many gradient functions have been traced (for tests)
        # Where the weights are, as TensorFlow reports it (metadata and logs show it).
        self.device = devices.weights_device(self.model) or self.placement.device
        if self.placement.policy is not None and not self.has_layers:
            log.warning(
                "model %s: mixed precision does not apply (its graph fixes its dtypes)", name
            )
        log.info(
            "model %s version %d: weights on %s, computing on %s",
            name,
            version,
            self.device,
            self.placement.describe(),
        )

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> ModelRuntime:
        """Loads `model.keras` in safe mode: a model file can never run arbitrary code."""
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        return cls(name, version, model, path)

    def _forward(self, inputs: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        feed = self.preprocessing.apply(inputs)
        out = self.model(feed if len(feed) > 1 else feed[0], training=False)
        return tuple(out) if isinstance(out, list | tuple) else (out,)

    def output_model(self, targets: Sequence[Target]) -> Any:
        """For a model without Keras layers (`has_layers` false): the callable
        `inputs -> [*the targets' outputs, *outputs]` the methods differentiate, with
        the preprocessing in front. A Keras model's come from `backprop.explain_model`.
        """
        raise NotImplementedError(f"model {self.name!r} has Keras layers")

    # Inputs -----------------------------------------------------------------

    def check_inputs(
        self, arrays: dict[str, np.ndarray], max_batch: int, max_free_axis: int | None = None
    ) -> list[np.ndarray]:
        """Request inputs ordered and checked against this model's (`checks`)."""
        return checks.check_inputs(self, arrays, max_batch, max_free_axis)

    # Predict ----------------------------------------------------------------

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for checked inputs (of the model's dtypes or of
        accepted wire dtypes).
        """
        dtypes = tuple(x.dtype.name for x in inputs)
        predict = self._predict if self.wire.is_native(dtypes) else self._wire_predict(dtypes)
        with self.on_device():
            outputs = predict(tuple(tf.convert_to_tensor(x) for x in inputs))
            host = [o.numpy() for o in outputs]
        if not all(np.isfinite(o).all() for o in host if o.dtype.kind == "f"):
            raise self._not_finite()
        return host

    def wire_specs(self, dtypes: Sequence[str]) -> tuple[tf.TensorSpec, ...]:
        """The input signature of requests whose inputs have these dtypes."""
        return tuple(
            tf.TensorSpec(spec.shape, dtype, name=spec.name)
            for spec, dtype in zip(self.input_specs, dtypes, strict=True)
        )

    def _wire_predict(self, dtypes: tuple[str, ...]) -> Any:
        """Predict for inputs of accepted wire dtypes: cast on the device, then the
        model's forward pass, in one compiled function.
        """
        with self._lock:
            fn = self._wire_predicts.get(dtypes)
            if fn is None:
                fn = tf.function(
                    lambda inputs: self._forward(self.wire.cast(inputs)),
                    input_signature=[self.wire_specs(dtypes)],
                    jit_compile=self.placement.jit_compile,
                )
                self._wire_predicts[dtypes] = fn
            return fn

    def _wire_function(
        self,
        graph: Graph,
        dtypes: tuple[str, ...],
        inner: DeviceFunction,
        params: Mapping[str, np.ndarray],
    ) -> DeviceFunction:
        """The device function of `graph` for inputs of wire dtypes: the cast, then
        the model's own function (`inner`, traced once for both), so that gradients
        are taken with respect to the float input the cast makes.
        """
        key = (graph, dtypes)
        with self._lock:
            entry = self._wire_functions.get(key)
            if entry is not None and entry[0] is inner:
                self._wire_functions.move_to_end(key)
                return entry[1]

            @tf.function(input_signature=[self.wire_specs(dtypes), param_specs(params)])
            def cast_then(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
                return inner(self.wire.cast(inputs), params)

            wrapped: DeviceFunction = cast_then
            self._wire_functions[key] = (inner, wrapped)
            if len(self._wire_functions) > FUNCTION_CACHE_SIZE:
                self._wire_functions.popitem(last=False)
            return wrapped

    def _not_finite(self) -> InvalidArgument:
        """Inputs are finite (checked); outputs that are not mean the layers could
        not compute on them: a compiled convolution on an input smaller than its
        kernel gives an empty result, which pooling turns into NaN, where eager
        Keras would have raised.
        """
        return InvalidArgument(
            f"inputs do not fit model {self.name!r}: its layers fail on them (its outputs "
            "are not finite: an input too small for its layers leaves them nothing to "
            "compute on); send inputs the model accepts (GetModelMetadata lists their shapes)"
        )

    # Explain ----------------------------------------------------------------

    def check_options(self, options: ExplainOptions, limits: Limits) -> None:
        """Rejects options no model could honour, before any work is queued.

        The model's configured defaults fill what the request left unset, and its
        caps lower the server's `limits`.
        """
        options = self.config.explain.apply(options)
        limits = self.config.limits.apply(limits)
        if options.method not in METHODS:
            raise InvalidArgument(
                f"explanation.method={options.method!r} is unknown: use one of {allowed(METHODS)}"
            )
        backprop.check_name(options)
        randomize.check(self, options)
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
                f"explanation.objectives has {len(options.objectives)} entries, over "
                f"{limits.whose('max_objectives')} max_objectives={limits.max_objectives}"
            )
        for k, objective in enumerate(options.objectives):
            if not np.isfinite(objective.weight):
                raise InvalidArgument(
                    f"explanation.objectives[{k}].weight={objective.weight} is not finite"
                )
            limits.check_filter_indices(k, len(objective.filter_indices))
        if options.samples > limits.max_samples:
            raise InvalidArgument(
                f"explanation.samples={options.samples} is over {limits.whose('max_samples')} "
                f"max_samples={limits.max_samples}: use 1..{limits.max_samples} (0 for the "
                f"default, {self.config.explain.samples or DEFAULT_SAMPLES})"
            )
        if options.steps > limits.max_steps:
            raise InvalidArgument(
                f"explanation.steps={options.steps} is over {limits.whose('max_steps')} "
                f"max_steps={limits.max_steps}: use 1..{limits.max_steps} (0 for the "
                f"default, {self.config.explain.steps or DEFAULT_STEPS})"
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
        if options.method == OCCLUSION:
            occlusion.check_windows(self, options, limits)

    def cached_plan(self, options: ExplainOptions, batch: int) -> Plan | None:
        """The plan of checked options planned before at this batch size, made fresh
        for this request (`Method.fresh`); None when it must be `plan`ned. Takes no
        lock and computes nothing on the device: the event loop calls it.
        """
        try:
            entry = self._plans.get((options, batch))
        except TypeError:  # unhashable options (an explicit baseline array)
            return None
        if entry is None:
            return None
        plan, applied = entry
        return METHODS[plan.graph.method].fresh(plan, applied)

    def plan(self, options: ExplainOptions, batch: int) -> Plan:
        """Resolves checked options for a request of `batch` samples (engine step 1)."""
        plan, applied = self._plan(options, batch)
        try:
            key = (options, batch)
            hash(key)
        except TypeError:
            return plan
        if sum(p.nbytes for p in plan.params.values()) <= PLAN_CACHE_BYTES:
            for value in plan.params.values():
                value.flags.writeable = False  # shared by every request that reuses it
            with self._lock:
                self._plans[key] = (plan, applied)
                while len(self._plans) > PLAN_CACHE_SIZE:
                    del self._plans[next(iter(self._plans))]
        return plan

    def _plan(self, options: ExplainOptions, batch: int) -> tuple[Plan, ExplainOptions]:
        options = self.config.explain.apply(options)
        method = METHODS[options.method]
        with self._lock:
            plan = method.plan(self, options, batch)
        _check_honoured(options, plan)
        if options.randomize_layers:
            # Planned on the trained model (same layers and indices as the copy); the
            # graph key sends the device call to a function built on the copy.
            key = (options.randomize_layers, options.randomize_seed)
            plan.graph = dataclasses.replace(plan.graph, randomize=key)
            plan.resolved = dataclasses.replace(
                plan.resolved,
                randomized_layers=randomize.layer_names(self, options.randomize_layers),
                randomization_seed=options.randomize_seed,
            )
        return plan, options

    def compute(
        self, graph: Graph, inputs: Sequence[np.ndarray], params: Mapping[str, np.ndarray]
    ) -> tuple[Tensors, RawTensors]:
        """One device call of one graph on a (possibly merged) batch (engine step 2)."""
        fn = self._device_function(graph, params)
        dtypes = tuple(x.dtype.name for x in inputs)
        if not self.wire.is_native(dtypes):
            fn = self._wire_function(graph, dtypes, fn, params)
        with self.on_device():
            outputs, raw = fn(
                tuple(tf.convert_to_tensor(x) for x in inputs),
                {key: tf.convert_to_tensor(value) for key, value in params.items()},
            )
            checks = [tf.reduce_all(tf.math.is_finite(o)) for o in outputs if o.dtype.is_floating]
            if checks and not bool(tf.reduce_all(checks)):
                raise self._not_finite()
            return outputs, raw

    def finish(self, plan: Plan, outputs: Sequence[tf.Tensor], raw: RawTensors) -> ExplainResult:
        """A request's result from its own rows of a device call (engine step 3)."""
        with self.on_device():
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
        with self.on_device():
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

    gather_rows = staticmethod(rows.gather_rows)
    split_rows = staticmethod(rows.split_rows)
    concat_rows = staticmethod(rows.concat_rows)

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
            if graph.randomize is None:
                fn = METHODS[graph.method].build(self, graph, param_specs(params))
            else:
                twin = randomize.copy_runtime(self, *graph.randomize)
                plain = dataclasses.replace(graph, randomize=None)
                fn = METHODS[graph.method].build(twin, plain, param_specs(params))
            if self.placement.xla and METHODS[graph.method].xla:
                fn = _with_xla(fn)
            self._functions[graph] = fn
            if len(self._functions) > FUNCTION_CACHE_SIZE:
                self._functions.popitem(last=False)
            return fn

    def forget_functions(self, stale: Callable[[Graph], bool]) -> None:
        """Drops the compiled functions of the graphs `stale` selects (with _lock held)."""
        for graph in [g for g in self._functions if stale(g)]:
            del self._functions[graph]
        for key in [k for k in self._wire_functions if stale(k[0])]:
            del self._wire_functions[key]

    def supported_methods(self) -> tuple[str, ...]:
        """The methods this model can be explained with."""
        return tuple(name for name, method in METHODS.items() if method.supported(self) is None)

    def backprop_modifiers(self) -> tuple[str, ...]:
        """The backprop modifiers this model can be explained with."""
        return backprop.supported_modifiers(self)

    def default_grad_modifier(self, options: ExplainOptions) -> str:
        """The grad modifier of the map `options` get when they name none: the model's
        configured default, else the method's ("" for a method that is not known,
        which `check_options` refuses, naming it).
        """
        options = self.config.explain.apply(options)
        if options.grad_modifiers:
            return options.grad_modifiers[0]
        method = METHODS.get(options.method)
        return "" if method is None else method.default_grad_modifier

    def with_model(self, model: keras.Model) -> ModelRuntime:
        """A runtime of another Keras model (a randomised copy of this one) with this
        one's name, version, files, configuration and placement.
        """
        return ModelRuntime(self.name, self.version, model, self.path, self.config, self.placement)

    def derive(self, key: Hashable, make: Callable[[], T]) -> T:
        """A model or fact derived from this one (a backprop-modified copy, a layer
        scan), made by `make` once per key and kept for the runtime's life.
        """
        with self._lock:
            if key not in self._derived:
                self._derived[key] = make()
            value: T = self._derived[key]
            return value

    @property
    def derived(self) -> Mapping[Any, Any]:
        """What `derive` made so far, by key (read-only: for tests and diagnostics)."""
        return MappingProxyType(self._derived)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Holds the runtime's planning lock (re-entrant): the target resolver, the
        derived models and the compiled functions change only under it.
        """
        with self._lock:
            yield

    def count_trace(self) -> None:
        """Called by device functions while they are traced (tests count retraces)."""
        self.traces += 1

    # Device -----------------------------------------------------------------

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """The model's device scope; running out of device memory fails only the
        call, as RESOURCE_EXHAUSTED.
        """
        with self.placement.scope(), _device_errors(self.name):
            yield

    def enter_device(self) -> None:
        """Puts the calling thread inside this model's device scope for good: the
        initializer of the model's device thread, so that the batcher's row
        bookkeeping between calls (splits, gathers, concatenations) stays on the
        device as well.
        """
        self.placement.scope().__enter__()

    # Warm-up ----------------------------------------------------------------

    def warm_up(
        self,
        buckets: Sequence[int] = (1,),
        explanations: Sequence[ExplainOptions] | None = None,
    ) -> None:
        """Runs predict and the default explanations at every bucket (`warmup`)."""
        warmup.warm_up(self, buckets, explanations)
