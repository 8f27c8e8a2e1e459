"""The `salience.v1.Salience` servicer: decode, await the core, encode. Nothing else.

Errors raised anywhere below are ServiceErrors; the interceptor in `errors` turns
them into statuses, so no method handles them itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

from grpc import aio

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_server import convert
from salience_server.core import InferenceCore
from salience_server.errors import label_call, label_explain
from salience_server.explain import catalog
from salience_server.stream import explain_stream


def deadline(context: aio.ServicerContext) -> float | None:
    """The caller's deadline as a `time.monotonic()` instant (None: it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SalienceServicer(salience_pb2_grpc.SalienceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def Predict(
        self, request: pb.PredictRequest, context: aio.ServicerContext
    ) -> pb.PredictResponse:
        label_call(request.model.name, "predict")
        convert.check_model(request.model)
        arrays = convert.request_inputs(request.inputs)
        runtime, outputs = await self.core.predict(
            request.model.name, request.model.version, arrays, deadline(context)
        )
        return pb.PredictResponse(
            model=convert.model_spec(runtime),
            outputs=convert.output_tensors(runtime, outputs),
            labels=convert.top_labels(runtime, outputs),
        )

    async def Explain(
        self, request: pb.ExplainRequest, context: aio.ServicerContext
    ) -> pb.ExplainResponse:
        # Labelled first, so requests that fail to decode are counted by model too.
        label_explain(request.model.name, request.explanation.method)
        convert.check_model(request.model)
        arrays = convert.request_inputs(request.inputs)
        options = convert.explain_options(request.explanation, self.core.settings.limits)
        runtime, result = await self.core.explain(
            request.model.name, request.model.version, arrays, options, deadline(context)
        )
        return convert.explain_response(runtime, result)

    async def ExplainStream(
        self, request_iterator: AsyncIterator[pb.ExplainStreamRequest], context: aio.ServicerContext
    ) -> AsyncGenerator[pb.ExplainStreamResponse, None]:
        # Frames are read, batched and answered in order by `stream` (the window,
        # the per-frame errors, the clean-up on cancellation).
        frames = explain_stream(self.core, request_iterator, deadline(context))
        async with contextlib.aclosing(frames):
            async for response in frames:
                yield response

    def _metadata(self, name: str, version: int, with_layers: bool) -> pb.ModelMetadata:
        repository = self.core.repository
        runtime = self.core.runtime(name, version)
        settings = self.core.settings
        # A model's configuration may lower the server's caps.
        caps = runtime.config.limits
        metadata = convert.model_metadata(
            runtime,
            repository.versions(name),
            caps.batch_size(settings.max_batch_size),
            runtime.supported_methods(),
            catalog.grad_modifiers(),
            runtime.backprop_modifiers(),
            caps.apply(settings.limits),
            with_layers,
        )
        metadata.version_status.extend(convert.version_status(self.core.statuses(name)))
        return metadata

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadata:
        label_call(request.model.name, "")
        convert.check_model(request.model)
        return self._metadata(request.model.name, request.model.version, with_layers=True)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        names = self.core.ready_names()
        models = [self._metadata(name, 0, with_layers=False) for name in names]
        # Models that do not serve (loading, or failed as a whole) are listed too,
        # with only their name and version states (as `readiness` shows them: a
        # warming model's loaded versions are loading), so operators see why.
        for name in sorted(self.core.repository.known() - set(names)):
            statuses = convert.version_status(self.core.statuses(name))
            if statuses:
                models.append(pb.ModelMetadata(name=name, version_status=statuses))
        return pb.ListModelsResponse(models=models)
