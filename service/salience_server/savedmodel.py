"""A TensorFlow SavedModel served through its `serving_default` signature.

A SavedModel (from `model.export(...)` or `tf.saved_model.save(...)`) is a graph of
TensorFlow ops behind named signatures, without Keras layers. Its inputs and
outputs are those of the signature, and everything that needs only the gradient of
an output with respect to an input works through it: predictions, and the methods
`vanilla`, `smoothgrad`, `integrated-gradients` and `gradient-x-input`, with the same
per-sample scores, batching and finishing as a Keras model.

What needs layers cannot work and is refused with FAILED_PRECONDITION saying why: an
objective on anything but an output of the signature (a layer name or index), `wrt`,
the CAM methods (`gradcam`, `gradcam++`, `guided-gradcam`), `penultimate_layer` and
backprop modifiers. `GetModelMetadata` lists only the supported methods, no backprop
modifier and no layer.

An objective names an output by its signature name (or leaves `layer` unset for
`explanation.output`, by default the first output); its filter indices are units of
the output's last axis. Outputs are scored as they are: the signature exposes no
pre-activation, so `used_logits` is always false — export the logits as an output
of their own to explain them.

Loading runs no Python code from the model directory, but the graph may use any
TensorFlow op (file reads included): serve SavedModels from sources you trust.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument, allowed
from salience_server.explain.methods import METHODS
from salience_server.explain.options import (
    ExplainOptions,
    LayerSelector,
    Limits,
    Objective,
    ResolvedObjective,
)
from salience_server.explain.targets import Target, TargetResolver
from salience_server.explain.wrt import field_value
from salience_server.model_config import ModelConfig
from salience_server.runtime import ModelRuntime, TensorInfo

SIGNATURE = "serving_default"
# The dtypes requests can send and responses carry (the wire codec's).
WIRE_DTYPES = frozenset({tf.float16, tf.float32, tf.float64, tf.uint8, tf.int32, tf.int64, tf.bool})
NO_LAYERS = "it is a SavedModel, served through its serving signature, without Keras layers"


class ModelFormatError(ValueError):
    """A SavedModel that cannot be served (no serving signature, odd tensors)."""


def _tensor_infos(specs: Sequence[tuple[str, Any]], what: str) -> tuple[TensorInfo, ...]:
    infos = []
    for name, spec in specs:
        if not isinstance(spec, tf.TensorSpec):
            raise ModelFormatError(
                f"signature {SIGNATURE!r} {what} {name!r} is a {type(spec).__name__}, not a "
                "dense tensor: only dense tensors can be served"
            )
        if spec.shape.rank is None:
            raise ModelFormatError(
                f"signature {SIGNATURE!r} {what} {name!r} has an unknown rank: export it with "
                "a shape (the batch axis may be free)"
            )
        if spec.dtype not in WIRE_DTYPES:
            raise ModelFormatError(
                f"signature {SIGNATURE!r} {what} {name!r} has dtype {spec.dtype.name}, which "
                "requests cannot carry: use float16/32/64, uint8, int32, int64 or bool"
            )
        infos.append(
            TensorInfo(
                name=name,
                dtype=str(np.dtype(spec.dtype.as_numpy_dtype)),
                shape=tuple(spec.shape.as_list()),
            )
        )
    return tuple(infos)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sorts names with their digit runs as numbers: output_2 before output_10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    )


def _layer_refused(field: str, selector: LayerSelector, model: str, outputs: Sequence[str]) -> Any:
    return FailedPrecondition(
        f"{field_value(field, selector)} cannot be used on model {model!r}: {NO_LAYERS}, so "
        f"an objective can only name one of its outputs: choose one of {allowed(outputs)}, "
        "or leave the layer unset for the output head"
    )


class SignatureResolver(TargetResolver):
    """Objectives resolved against the outputs of a signature: a Target's
    `layer_index` is the output's index, and outputs are never read as logits.
    """

    def __init__(self, model: str, outputs: Sequence[TensorInfo]) -> None:
        super().__init__(None)
        self.model_name = model
        self.outputs = tuple(outputs)
        self.names = [info.name for info in outputs]

    def output_name(self, output_name: str = "") -> str:
        if output_name and output_name not in self.names:
            raise InvalidArgument(
                f"explanation.output={output_name!r} is not an output of the model: "
                f"choose one of {allowed(self.names)}"
            )
        return output_name or self.names[0]

    def _output(self, k: int, objective: Objective, default: str) -> int:
        field = f"objectives[{k}].layer"
        if objective.layer is None:
            return self.names.index(default)
        if isinstance(objective.layer, str) and objective.layer in self.names:
            return self.names.index(objective.layer)
        raise _layer_refused(field, objective.layer, self.model_name, self.names)

    def resolve(
        self, objectives: Sequence[Objective], keep_activation: bool, output_name: str = ""
    ) -> tuple[tuple[Target, ...], tuple[np.ndarray, ...], tuple[ResolvedObjective, ...]]:
        default = self.output_name(output_name)
        slots: dict[Target, np.ndarray] = {}
        resolved = []
        for k, objective in enumerate(objectives):
            index = self._output(k, objective, default)
            info = self.outputs[index]
            units = info.shape[-1] if len(info.shape) >= 2 else None
            if units is None or np.dtype(info.dtype).kind != "f":
                raise FailedPrecondition(
                    f"objectives[{k}] scores output {info.name!r} of shape {list(info.shape)} "
                    f"and dtype {info.dtype}: a target needs a floating-point output with a "
                    "batch axis and a known last axis"
                )
            weights = np.zeros(units, dtype=np.float32)
            for j, unit in enumerate(objective.filter_indices):
                if not 0 <= unit < units:
                    raise InvalidArgument(
                        f"objectives[{k}].filter_indices[{j}]={unit} is out of range: output "
                        f"{info.name!r} has {units} units (valid 0..{units - 1})"
                    )
                weights[unit] += 1.0
            if objective.filter_indices:
                reduction = "units" if len(info.shape) == 2 else "channel_mean"
            else:
                weights[:] = 1.0 / units
                reduction = "layer_mean"
            weights *= np.float32(objective.weight)
            target = Target(index, used_logits=False)
            slots[target] = slots.get(target, 0) + weights
            resolved.append(
                ResolvedObjective(
                    layer_name=info.name,
                    layer_index=index,
                    filter_indices=tuple(objective.filter_indices),
                    weight=float(objective.weight),
                    used_logits=False,
                    reduction=reduction,
                )
            )
        targets = tuple(sorted(slots, key=lambda t: t.layer_index))
        return targets, tuple(slots[t] for t in targets), tuple(resolved)

    def tensor(self, target: Target) -> Any:
        raise FailedPrecondition(f"model {self.model_name!r}: {NO_LAYERS}")


class _OutputModel:
    """`inputs -> [*the targets' outputs, *outputs]`, called like an explain model."""

    def __init__(self, runtime: SavedModelRuntime, targets: Sequence[Target]) -> None:
        self.runtime = runtime
        self.targets = tuple(targets)

    def __call__(self, x: Any, training: bool = False) -> list[tf.Tensor]:
        feed = tuple(x) if isinstance(x, list | tuple) else (x,)
        outputs = self.runtime._forward(feed)
        return [*(outputs[t.layer_index] for t in self.targets), *outputs]


class SavedModelRuntime(ModelRuntime):
    """A SavedModel's serving signature, ready to predict and explain (input
    gradients only; see the module docstring).
    """

    has_layers = False
    platform = "tensorflow_savedmodel"

    def __init__(
        self,
        name: str,
        version: int,
        loaded: Any,
        path: Path | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        signatures = getattr(loaded, "signatures", {})
        if SIGNATURE not in signatures:
            raise ModelFormatError(
                f"the SavedModel has no {SIGNATURE!r} signature (it has "
                f"{allowed(sorted(signatures)) or 'none'}): export it with model.export() or "
                f"tf.saved_model.save(..., signatures=...)"
            )
        # Keep the loaded object: the signature's variables belong to it.
        self.model = loaded
        self._signature = signatures[SIGNATURE]
        args, kwargs = self._signature.structured_input_signature
        if args:
            raise ModelFormatError(
                f"signature {SIGNATURE!r} takes positional arguments: a serving signature "
                "takes its inputs by name"
            )
        # The signature's own argument order (its keywords are its inputs).
        order = list(getattr(self._signature, "_arg_keywords", None) or sorted(kwargs))
        inputs = _tensor_infos([(key, kwargs[key]) for key in order], "input")
        structured = self._signature.structured_outputs
        if not isinstance(structured, dict) or not structured:
            raise ModelFormatError(
                f"signature {SIGNATURE!r} does not return a dict of named outputs"
            )
        # The restored dict's order is arbitrary: natural order of the names puts
        # output_2 before output_10, as the model's outputs were.
        outputs = _tensor_infos(
            sorted(structured.items(), key=lambda item: _natural_key(item[0])), "output"
        )
        self._input_names = [info.name for info in inputs]
        self._output_names = [info.name for info in outputs]
        self._setup(
            name,
            version,
            path,
            config,
            inputs=inputs,
            outputs=outputs,
            layers=(),
            resolver=SignatureResolver(name, outputs),
        )

    @classmethod
    def load_dir(
        cls, name: str, version: int, path: Path, config: ModelConfig | None = None
    ) -> SavedModelRuntime:
        """Loads the SavedModel in directory `path` (holding `saved_model.pb`)."""
        return cls(name, version, tf.saved_model.load(str(path)), path, config)

    def _forward(self, inputs: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        feed = self.preprocessing.apply(inputs)
        out = self._signature(**dict(zip(self._input_names, feed, strict=True)))
        return tuple(out[name] for name in self._output_names)

    def output_model(self, targets: Sequence[Target]) -> Any:
        return _OutputModel(self, targets)

    def check_options(self, options: ExplainOptions, limits: Limits) -> None:
        """The checks of every model, then FAILED_PRECONDITION for what needs layers."""
        super().check_options(options, limits)
        options = self.config.explain.apply(options)
        where = f"model {self.name!r}: {NO_LAYERS}"
        supported = self.supported_methods()
        if options.method not in supported:
            raise FailedPrecondition(
                f"explanation.method={options.method!r} cannot be used on {where}, and "
                f"{options.method} weights the activations of one of its layers: use one of "
                f"{allowed(supported)}"
            )
        if options.backprop_modifier:
            raise FailedPrecondition(
                f"explanation.backprop_modifier={options.backprop_modifier!r} cannot be used on "
                f"{where}, and a backprop modifier changes how gradients pass through the "
                "ReLUs of its layers: explain without a backprop modifier"
            )
        if options.wrt is not None:
            raise FailedPrecondition(
                f"{field_value('explanation.wrt', options.wrt)} cannot be used on {where}, so "
                "there is no layer output to take the gradient with respect to: leave wrt "
                "unset for the gradient with respect to the input"
            )
        if options.penultimate_layer is not None:
            raise FailedPrecondition(
                f"{field_value('explanation.penultimate_layer', options.penultimate_layer)} "
                f"cannot be used on {where}: leave it unset"
            )
        for k, objective in enumerate(options.objectives):
            if objective.layer is not None and objective.layer not in self._output_names:
                raise _layer_refused(
                    f"explanation.objectives[{k}].layer",
                    objective.layer,
                    self.name,
                    self._output_names,
                )

    def supported_methods(self) -> tuple[str, ...]:
        """The methods that need only input gradients, in the registry's order."""
        return tuple(name for name, method in METHODS.items() if not method.needs_layers)

    def backprop_modifiers(self) -> tuple[str, ...]:
        return ()
