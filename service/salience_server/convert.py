"""Protobuf ⇄ domain types for the servicer; tensors go through the shared codec."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.tensors import TensorError
from salience_server import readiness
from salience_server.errors import InvalidArgument, allowed
from salience_server.explain import catalog
from salience_server.explain.options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_OCCLUSION_VALUE,
    MAX_CHUNK_SIZE,
    MAX_XRAI_SCALES,
    VANILLA,
    ExplainOptions,
    ExplainResult,
    LayerSelector,
    Limits,
    Objective,
)
from salience_server.seam import ModelDevice, TensorInfo

# Longest string a request field may hold. Names (of models, layers, inputs,
# methods, modifiers) are short, and error messages echo them: a status's message
# travels in a header that gRPC clients cap at 8 to 16 KiB, so a longer name would
# turn the precise refusal into a transport error.
MAX_NAME_CHARS = 256
# Most tensors one request may carry: models take a handful of inputs, and each
# tensor is decoded on the event loop before the model is known.
MAX_INPUTS = 1024
# Weights and noise are computed in float32: a larger double would become inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_name(field: str, value: str) -> None:
    """Refuses a string longer than any name, without echoing it."""
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"{field} has {len(value)} characters, longer than any name: use at most "
            f"{MAX_NAME_CHARS}"
        )


def check_model(spec: pb.ModelSpec) -> None:
    """What can be checked of a ModelSpec before the repository is asked."""
    check_name("model.name", spec.name)


def request_inputs(inputs: Sequence[pb.Tensor]) -> dict[str, np.ndarray]:
    """Decodes request tensors keyed by name; checks byte lengths and duplicates."""
    if not inputs:
        raise InvalidArgument("inputs is empty: send one tensor per model input")
    if len(inputs) > MAX_INPUTS:
        raise InvalidArgument(
            f"inputs has {len(inputs)} tensors: send one per model input, at most {MAX_INPUTS}"
        )
    arrays: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(inputs):
        check_name(f"inputs[{k}].name", tensor.name)
        if tensor.name in arrays:
            raise InvalidArgument(f"inputs[{k}].name={tensor.name!r} is given twice")
        try:
            arrays[tensor.name] = tensors.decode(tensor, f"inputs[{k}]")
        except TensorError as err:
            raise InvalidArgument(str(err)) from None
    return arrays


def _layer(ref: pb.LayerRef) -> LayerSelector:
    which = ref.WhichOneof("ref")
    if which == "name":
        return ref.name
    if which == "index":
        return ref.index
    return None


def _check_sizes(explanation: pb.Explanation, limits: Limits) -> None:
    """Refuses lists longer than the server's caps before a single entry is
    converted: a message may carry millions of entries, and the conversion runs on
    the event loop. A model's own caps, which may be lower, are checked later.
    """
    if len(explanation.objectives) > limits.max_objectives:
        raise InvalidArgument(
            f"explanation.objectives has {len(explanation.objectives)} entries, over the "
            f"server's max_objectives={limits.max_objectives}"
        )
    for k, objective in enumerate(explanation.objectives):
        limits.check_filter_indices(k, len(objective.filter_indices))
    grad_modifiers = catalog.grad_modifiers()
    if len(explanation.grad_modifiers) > len(grad_modifiers):
        raise InvalidArgument(
            f"explanation.grad_modifiers has {len(explanation.grad_modifiers)} entries, but "
            f"there are {len(grad_modifiers)} grad modifiers: list each once, from "
            f"{allowed(grad_modifiers)}"
        )


def _check_names(explanation: pb.Explanation) -> None:
    """Every string of an Explanation, checked before any check can echo one."""
    names = {
        "explanation.method": explanation.method,
        "explanation.backprop_modifier": explanation.backprop_modifier,
        "explanation.input": explanation.input,
        "explanation.output": explanation.output,
        "explanation.wrt.name": explanation.wrt.name,
        "explanation.penultimate_layer.name": explanation.penultimate_layer.name,
        "explanation.baseline.name": explanation.baseline.name,
    }
    names.update(
        (f"explanation.grad_modifiers[{k}]", name)
        for k, name in enumerate(explanation.grad_modifiers)
    )
    names.update(
        (f"explanation.objectives[{k}].layer.name", o.layer.name)
        for k, o in enumerate(explanation.objectives)
    )
    for field, value in names.items():
        check_name(field, value)


def _weight(k: int, objective: pb.Objective) -> float:
    if not objective.HasField("weight"):
        return 1.0
    weight = objective.weight
    if not (np.isfinite(weight) and abs(weight) <= FLOAT32_MAX):
        raise InvalidArgument(
            f"explanation.objectives[{k}].weight={weight} is not allowed: use a finite "
            f"value of magnitude at most {FLOAT32_MAX:.7g} (scores are float32)"
        )
    return weight


def explain_options(explanation: pb.Explanation, limits: Limits | None = None) -> ExplainOptions:
    """Fills in every default of an Explanation; model-specific checks come later.

    With the server's `limits`, over-long lists are refused before they are read.
    """
    if limits is not None:
        _check_sizes(explanation, limits)
    _check_names(explanation)
    output_dtype = explanation.output_dtype or pb.DATA_TYPE_FLOAT32
    objectives = tuple(
        Objective(
            layer=_layer(o.layer),
            filter_indices=tuple(int(i) for i in o.filter_indices),
            weight=_weight(k, o),
        )
        for k, o in enumerate(explanation.objectives)
    ) or (Objective(),)
    baseline = None
    if explanation.HasField("baseline"):
        try:
            baseline = tensors.decode(explanation.baseline, "explanation.baseline")
        except TensorError as err:
            raise InvalidArgument(str(err)) from None
    noise = explanation.noise if explanation.HasField("noise") else None
    if noise is not None and not (np.isfinite(noise) and 0 <= noise <= FLOAT32_MAX):
        raise InvalidArgument(
            f"explanation.noise={noise} is not allowed: use a finite value >= 0 (a fraction "
            f"of each sample's value range, at most {FLOAT32_MAX:.7g} as it is computed in "
            "float32; unset means the default)"
        )
    if explanation.chunk_size > MAX_CHUNK_SIZE:
        raise InvalidArgument(
            f"explanation.chunk_size={explanation.chunk_size} is out of range: use "
            f"1..{MAX_CHUNK_SIZE} rows per forward pass (0 for the default, {DEFAULT_CHUNK_SIZE})"
        )
    occlusion_value = (
        explanation.occlusion_value if explanation.HasField("occlusion_value") else None
    )
    if occlusion_value is not None and not (
        np.isfinite(occlusion_value) and abs(occlusion_value) <= FLOAT32_MAX
    ):
        raise InvalidArgument(
            f"explanation.occlusion_value={occlusion_value} is not allowed: use a finite "
            f"value of magnitude at most {FLOAT32_MAX:.7g} (unset means "
            f"{DEFAULT_OCCLUSION_VALUE})"
        )
    return ExplainOptions(
        method=explanation.method or VANILLA,
        objectives=objectives,
        grad_modifiers=tuple(explanation.grad_modifiers),
        keepdims=explanation.keepdims,
        normalize=explanation.normalize if explanation.HasField("normalize") else True,
        keep_activation=explanation.keep_activation,
        output_dtype=tensors.dtype_name(output_dtype),
        input_name=explanation.input,
        seed=explanation.seed if explanation.HasField("seed") else None,
        backprop_modifier=explanation.backprop_modifier,
        wrt=_layer(explanation.wrt) if explanation.HasField("wrt") else None,
        output_name=explanation.output,
        penultimate_layer=_layer(explanation.penultimate_layer)
        if explanation.HasField("penultimate_layer")
        else None,
        samples=explanation.samples,
        noise=noise,
        steps=explanation.steps,
        baseline=baseline,
        randomize_layers=explanation.randomization.layers,
        randomize_seed=explanation.randomization.seed,
        chunk_size=explanation.chunk_size,
        top_channels=explanation.top_channels,
        window=explanation.window,
        stride=explanation.stride,
        occlusion_value=occlusion_value,
        **_path_options(explanation),
        unset=_unset_options(explanation),
    )


# The path methods' optional parameters (Explanation fields 30-38), unset as None.
_PATH_OPTIONALS = (
    "blur_max_sigma",
    "blur_grad_step",
    "guided_fraction",
    "guided_max_dist",
    "xrai_sigma",
    "xrai_min_size",
    "xrai_dilation_radius",
    "xrai_area_threshold",
)


def _path_options(explanation: pb.Explanation) -> dict[str, Any]:
    """The path methods' parameters; their methods check the ranges."""
    if len(explanation.xrai_scales) > MAX_XRAI_SCALES:
        raise InvalidArgument(
            f"explanation.xrai_scales has {len(explanation.xrai_scales)} entries, over the "
            f"most of {MAX_XRAI_SCALES}: list at most {MAX_XRAI_SCALES} scales (empty means "
            "the default ones)"
        )
    options: dict[str, Any] = {
        name: getattr(explanation, name) if explanation.HasField(name) else None
        for name in _PATH_OPTIONALS
    }
    options["xrai_scales"] = tuple(float(v) for v in explanation.xrai_scales)
    return options


def _unset_options(explanation: pb.Explanation) -> frozenset[str]:
    """The ExplainOptions fields the request left unset, which a model's configured
    defaults may fill (the others' unset value cannot be told from a chosen one).
    """
    unset = {
        "method": not explanation.method,
        "grad_modifiers": not explanation.grad_modifiers,
        "normalize": not explanation.HasField("normalize"),
        "output_dtype": explanation.output_dtype == pb.DATA_TYPE_UNSPECIFIED,
        "samples": explanation.samples == 0,
        "noise": not explanation.HasField("noise"),
        "steps": explanation.steps == 0,
    }
    return frozenset(name for name, is_unset in unset.items() if is_unset)


def model_spec(runtime: ModelDevice) -> pb.ModelSpec:
    return pb.ModelSpec(name=runtime.name, version=runtime.version)


def top_labels(runtime: ModelDevice, outputs: Sequence[np.ndarray]) -> list[str]:
    """Per sample, the label of its predicted class (empty when the model has none)."""
    return runtime.config.top_labels([info.name for info in runtime.outputs], outputs)


def output_tensors(runtime: ModelDevice, outputs: Sequence[np.ndarray]) -> list[pb.Tensor]:
    return [
        tensors.encode(array, info.name)
        for info, array in zip(runtime.outputs, outputs, strict=True)
    ]


def explain_response(runtime: ModelDevice, result: ExplainResult) -> pb.ExplainResponse:
    r = result.resolved
    resolved = pb.ResolvedExplanation(
        method=r.method,
        objectives=[
            pb.ResolvedObjective(
                layer_name=o.layer_name,
                layer_index=o.layer_index,
                filter_indices=list(o.filter_indices),
                weight=o.weight,
                used_logits=o.used_logits,
                reduction=o.reduction,
            )
            for o in r.objectives
        ],
        grad_modifiers=list(r.grad_modifiers),
        keepdims=r.keepdims,
        normalize=r.normalize,
        output_dtype=tensors.DTYPES_BY_NAME[r.output_dtype],
        input=r.input_name,
        channels_reduced=r.channels_reduced,
        seed=r.seed,
        backprop_modifier=r.backprop_modifier,
        wrt=r.wrt,
        penultimate_layer=r.penultimate_layer,
        samples=r.samples,
        noise=r.noise,
        steps=r.steps,
        output=r.output_name,
        randomized_layers=list(r.randomized_layers),
        randomization_seed=r.randomization_seed,
        chunk_size=r.chunk_size,
        top_channels=r.top_channels,
        window=r.window,
        stride=r.stride,
        occlusion_value=r.occlusion_value,
        blur_max_sigma=r.blur_max_sigma,
        blur_grad_step=r.blur_grad_step,
        guided_fraction=r.guided_fraction,
        guided_max_dist=r.guided_max_dist,
        xrai_scales=list(r.xrai_scales),
        xrai_sigma=r.xrai_sigma,
        xrai_min_size=r.xrai_min_size,
        xrai_dilation_radius=r.xrai_dilation_radius,
        xrai_area_threshold=r.xrai_area_threshold,
    )
    extras = {
        name: tensors.encode(np.asarray(value, dtype=np.float32), name)
        for name, value in result.extras.items()
    }
    return pb.ExplainResponse(
        model=model_spec(runtime),
        outputs=output_tensors(runtime, result.outputs),
        maps=[
            pb.SaliencyMap(grad_modifier=name, map=tensors.encode(array))
            for name, array in result.maps.items()
        ],
        resolved=resolved,
        labels=top_labels(runtime, result.outputs),
        **extras,
    )


def _tensor_spec(info: TensorInfo, labels: Sequence[str] = ()) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=info.name,
        dtype=tensors.wire_dtype(info.dtype),
        shape=[-1 if d is None else d for d in info.shape],
        labels=list(labels),
    )


def _input_spec(runtime: ModelDevice, info: TensorInfo) -> pb.TensorSpec:
    """An input's spec with the dtypes it accepts on the wire (the model's first)."""
    spec = _tensor_spec(info)
    wire = runtime.config.input_config(info.name)
    spec.accepted_dtypes.extend(tensors.wire_dtype(d) for d in (info.dtype, *wire.wire_dtypes))
    if wire.wire_dtypes:
        spec.wire_range = wire.wire_range
    return spec


def model_metadata(
    runtime: ModelDevice,
    versions: Sequence[int],
    max_batch_size: int,
    methods: Sequence[str],
    grad_modifiers: Sequence[str],
    backprop_modifiers: Sequence[str],
    limits: Limits,
    with_layers: bool,
) -> pb.ModelMetadata:
    labelled = runtime.config.labelled_output([o.name for o in runtime.outputs])
    layers = []
    if with_layers:
        layers = [
            pb.LayerInfo(
                name=layer.name,
                index=layer.index,
                kind=layer.kind,
                output_shape=[-1 if d is None else d for d in layer.output_shape or ()],
                activation=layer.activation,
            )
            for layer in runtime.layers
        ]
    return pb.ModelMetadata(
        name=runtime.name,
        versions=list(versions),
        version=runtime.version,
        inputs=[_input_spec(runtime, i) for i in runtime.inputs],
        outputs=[
            _tensor_spec(o, runtime.config.labels if k == labelled else ())
            for k, o in enumerate(runtime.outputs)
        ],
        layers=layers,
        methods=list(methods),
        grad_modifiers=list(grad_modifiers),
        max_batch_size=max_batch_size,
        backprop_modifiers=list(backprop_modifiers),
        max_samples=limits.max_samples,
        max_steps=limits.max_steps,
        device=runtime.device,
    )


VERSION_STATES = {
    readiness.LOADING: pb.VERSION_STATE_LOADING,
    readiness.READY: pb.VERSION_STATE_READY,
    readiness.FAILED: pb.VERSION_STATE_FAILED,
    readiness.UNLOADING: pb.VERSION_STATE_UNLOADING,
}


def version_status(statuses: Sequence[readiness.VersionStatus]) -> list[pb.VersionStatus]:
    """The repository's version states as `ModelMetadata.version_status`."""
    return [
        pb.VersionStatus(
            version=s.version,
            state=VERSION_STATES.get(s.state, pb.VERSION_STATE_UNSPECIFIED),
            reason=s.reason,
        )
        for s in statuses
    ]
