"""Protobuf ⇄ domain types for the servicer; tensors go through the shared codec."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.tensors import TensorError
from salience_server.errors import InvalidArgument
from salience_server.explain.options import (
    VANILLA,
    ExplainOptions,
    ExplainResult,
    LayerSelector,
    Limits,
    Objective,
)
from salience_server.repository import VersionStatus
from salience_server.runtime import ModelRuntime, TensorInfo


def request_inputs(inputs: Sequence[pb.Tensor]) -> dict[str, np.ndarray]:
    """Decodes request tensors keyed by name; checks byte lengths and duplicates."""
    if not inputs:
        raise InvalidArgument("inputs is empty: send one tensor per model input")
    arrays: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(inputs):
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


def explain_options(explanation: pb.Explanation) -> ExplainOptions:
    """Fills in every default of an Explanation; model-specific checks come later."""
    output_dtype = explanation.output_dtype or pb.DATA_TYPE_FLOAT32
    objectives = tuple(
        Objective(
            layer=_layer(o.layer),
            filter_indices=tuple(int(i) for i in o.filter_indices),
            weight=o.weight if o.HasField("weight") else 1.0,
        )
        for o in explanation.objectives
    ) or (Objective(),)
    baseline = None
    if explanation.HasField("baseline"):
        try:
            baseline = tensors.decode(explanation.baseline, "explanation.baseline")
        except TensorError as err:
            raise InvalidArgument(str(err)) from None
    noise = explanation.noise if explanation.HasField("noise") else None
    if noise is not None and not (np.isfinite(noise) and noise >= 0):
        raise InvalidArgument(
            f"explanation.noise={noise} is not allowed: use a finite value >= 0 (a fraction "
            "of each sample's value range; unset means the default)"
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
        unset=_unset_options(explanation),
    )


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


def model_spec(runtime: ModelRuntime) -> pb.ModelSpec:
    return pb.ModelSpec(name=runtime.name, version=runtime.version)


def top_labels(runtime: ModelRuntime, outputs: Sequence[np.ndarray]) -> list[str]:
    """Per sample, the label of its predicted class (empty when the model has none)."""
    return runtime.config.top_labels([info.name for info in runtime.outputs], outputs)


def output_tensors(runtime: ModelRuntime, outputs: Sequence[np.ndarray]) -> list[pb.Tensor]:
    return [
        tensors.encode(array, info.name)
        for info, array in zip(runtime.outputs, outputs, strict=True)
    ]


def explain_response(runtime: ModelRuntime, result: ExplainResult) -> pb.ExplainResponse:
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


def model_metadata(
    runtime: ModelRuntime,
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
        inputs=[_tensor_spec(i) for i in runtime.inputs],
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
    "loading": pb.VERSION_STATE_LOADING,
    "ready": pb.VERSION_STATE_READY,
    "failed": pb.VERSION_STATE_FAILED,
    "unloading": pb.VERSION_STATE_UNLOADING,
}


def version_status(statuses: Sequence[VersionStatus]) -> list[pb.VersionStatus]:
    """The repository's version states as `ModelMetadata.version_status`."""
    return [
        pb.VersionStatus(
            version=s.version,
            state=VERSION_STATES.get(s.state, pb.VERSION_STATE_UNSPECIFIED),
            reason=s.reason,
        )
        for s in statuses
    ]
