"""The Open Inference Protocol's servicer: decode (`codec`, `outputs`,
`parameters`), await the same InferenceCore as the Salience servicer, encode. The
answer follows what the core decided: the runtime it resolved and used, the
explanation it resolved (method, grad modifiers, seed), the model's platform from
its metadata.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata as importlib_metadata

import numpy as np
from grpc import aio

from inference.v2 import grpc_service_pb2 as oip
from inference.v2 import grpc_service_pb2_grpc
from salience_server import convert
from salience_server.core import InferenceCore
from salience_server.errors import InvalidArgument, allowed, label_call, label_explain
from salience_server.oip import codec
from salience_server.oip.outputs import SALIENCY, SALIENCY_PREFIX, requested_outputs
from salience_server.oip.parameters import explanation_parameters, grad_modifiers
from salience_server.oip.words import protocol_words
from salience_server.servicer import deadline

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "salience"
# What ServerMetadata lists: ModelInfer's saliency outputs and explanation parameters.
EXTENSIONS = ("saliency",)

VERSION = re.compile(r"[0-9]+")


def parse_version(field: str, text: str) -> int:
    """A request's version string as salience's number: "" is 0, the highest."""
    if text == "":
        return 0
    convert.check_name(field, text)
    if VERSION.fullmatch(text) is None or int(text) == 0:
        raise InvalidArgument(
            f"{field}={text!r} is not a version: use a positive whole number such as '1', "
            "or '' for the highest"
        )
    return int(text)


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers the protocol's six RPCs from the same core as the Salience servicer.

    `server_ready` says whether the server serves (every model loaded or failed, at
    least one ready, not shutting down); `stopping` whether shutdown has begun.
    """

    def __init__(
        self,
        core: InferenceCore,
        server_ready: Callable[[], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self.core = core
        self._server_ready = server_ready
        self._stopping = stopping
        try:
            self.version = importlib_metadata.version("salience")
        except importlib_metadata.PackageNotFoundError:
            self.version = "unknown"

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        # Answering at all is being live: the port opens before the models load.
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._server_ready())

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        # Not ready is an answer, not an error: loading, failed and unknown models
        # (Triton's convention) and versions not served are all `ready: false`.
        label_call(request.name, "")
        convert.check_name("name", request.name)
        version = parse_version("version", request.version)
        name = request.name
        ready = not self._stopping() and self.core.version_ready(name, version)
        return oip.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        label_call(request.name, "")
        convert.check_name("name", request.name)
        version = parse_version("version", request.version)
        with protocol_words("name", "version"):
            runtime = self.core.runtime(request.name, version)
        config = runtime.config
        return oip.ModelMetadataResponse(
            name=runtime.name,
            versions=[str(v) for v in self.core.repository.versions(runtime.name)],
            platform=runtime.platform,
            inputs=[codec.input_metadata(i, config.input_config(i.name)) for i in runtime.inputs],
            outputs=[codec.output_metadata(o) for o in runtime.outputs],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext
    ) -> oip.ModelInferResponse:
        # Labelled first, so requests that fail to decode are counted by model too.
        label_call(request.model_name, "predict")
        with protocol_words("model_name", "model_version"):
            return await self._infer(request, context)

    async def _infer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext
    ) -> oip.ModelInferResponse:
        name = request.model_name
        convert.check_name("model_name", name)
        version = parse_version("model_version", request.model_version)
        # The model's metadata, to check the requested outputs and datatypes before
        # any work is done, as GetModelMetadata reads it; the answer follows the
        # runtime the core used (a reload in between that dropped an output is
        # caught below).
        described = self.core.runtime(name, version)
        wanted = requested_outputs(request, described)
        params = explanation_parameters(request, wanted)
        if wanted.explains:
            label_explain(name, params.explanation.method)
        inputs = codec.request_inputs(request)
        codec.check_datatypes(request, described)
        maps: dict[str, np.ndarray] = {}
        response = oip.ModelInferResponse(id=request.id)
        if not wanted.explains:
            runtime, outputs = await self.core.predict(
                name, version, inputs.arrays, deadline(context)
            )
        else:
            limits = self.core.settings.limits
            default = grad_modifiers(described, params, wanted, limits)
            options = convert.explain_options(params.explanation, limits)
            runtime, result = await self.core.explain(
                name, version, inputs.arrays, options, deadline(context)
            )
            outputs = result.outputs
            if wanted.default_map:
                # Unset, the explanation's only map is the default one, whatever its name.
                maps[SALIENCY] = result.maps[default or next(iter(result.maps))]
            for modifier in wanted.modifiers:
                maps[SALIENCY_PREFIX + modifier] = result.maps[modifier]
            resolved = result.resolved
            response.parameters["method"].CopyFrom(codec.parameter(resolved.method))
            response.parameters["grad_modifiers"].CopyFrom(
                codec.parameter(",".join(resolved.grad_modifiers))
            )
            if resolved.seed is not None:
                response.parameters["seed"].CopyFrom(codec.parameter(resolved.seed))
        by_name = {info.name: array for info, array in zip(runtime.outputs, outputs, strict=True)}
        chosen: list[tuple[str, np.ndarray]] = []
        for output in wanted.names:
            array = maps.get(output) if output not in by_name else by_name[output]
            if array is None:  # a reload changed the model's outputs meanwhile
                raise InvalidArgument(
                    f"{output!r} is not an output of model {name!r} version {runtime.version}: "
                    f"use one of {allowed(by_name)}"
                )
            chosen.append((output, np.asarray(array)))
        # Raw when the request was raw, and whenever a value has no typed field
        # (FP16): the protocol answers either way for the whole response.
        raw = inputs.raw or codec.needs_raw([a for _, a in chosen])
        response.model_name = runtime.name
        response.model_version = str(runtime.version)
        for output, array in chosen:
            codec.output_tensor(response, output, array, raw)
        return response
