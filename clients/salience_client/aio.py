"""The asyncio client: the blocking client's API, awaited.

    async with AsyncSalienceClient("localhost:50051") as client:
        result = await client.explain("shapes", images, filter_indices=[2])

Same options, deadlines, retries, TLS and token as `SalienceClient` (see
`salience_client.client`), over one `grpc.aio` channel: many calls may be in
flight at once from one event loop, with no thread per call. Create the client
inside the event loop that uses it (in a coroutine, or `async with`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from typing import Any

import grpc
from grpc import aio

from salience.v1 import salience_pb2 as pb
from salience_client.channel import DEFAULT, Timeout, check_timeout
from salience_client.client import ClientBase
from salience_client.messages import (
    Inputs,
    explanation_request,
    explanation_result,
    predict_request,
    prediction_result,
)
from salience_client.results import Explanation, Prediction, SalienceError
from salience_client.stream import explain_stream_async


class AsyncSalienceClient(ClientBase):
    """An asyncio client; the constructor takes the options of `SalienceClient`
    (`channel`, if given, is a `grpc.aio.Channel`).

    Every call has a deadline: the client's `timeout` (60 s by default; None: no
    deadline), or a method's own `timeout=` — seconds, None for no deadline at all,
    or `DEFAULT` for the client's. Failures raise SalienceError.
    """

    def _open(self) -> aio.Channel:
        return self.config.open_aio()

    async def __aenter__(self) -> AsyncSalienceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    # `timeout` is the gRPC deadline, sent to the server, which drops a request whose
    # deadline passed; `asyncio.timeout` would only stop waiting here (ASYNC109).
    async def _call(self, method: Any, request: Any, timeout: Timeout) -> Any:  # noqa: ASYNC109
        kwargs = self._call_kwargs(timeout)
        try:
            return await method(request, **kwargs)
        except grpc.RpcError as err:  # aio.AioRpcError is one
            raise SalienceError.from_rpc_error(err, kwargs["timeout"]) from None

    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int = 0,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> Prediction:
        """The model's outputs for a batch (first axis) of inputs."""
        request = predict_request(model, inputs, version=version)
        return prediction_result(await self._call(self._stub.Predict, request, timeout))

    async def explain(
        self,
        model: str,
        inputs: Inputs,
        *,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
        **options: Any,
    ) -> Explanation:
        """Predictions and saliency maps; options as in `explanation_request`."""
        request = explanation_request(model, inputs, **options)
        return explanation_result(await self._call(self._stub.Explain, request, timeout))

    async def metadata(
        self,
        model: str,
        *,
        version: int = 0,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> pb.ModelMetadata:
        """Versions, inputs, outputs, layers and supported options of one model."""
        request = pb.GetModelMetadataRequest(model=pb.ModelSpec(name=model, version=version))
        return await self._call(self._stub.GetModelMetadata, request, timeout)

    async def list_models(
        self,
        *,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> list[pb.ModelMetadata]:
        """Every served model with its versions, inputs and outputs."""
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    def explain_stream(
        self,
        model: str,
        frames: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
        *,
        version: int = 0,
        window: int = 0,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncGenerator[tuple[Any, Explanation], None]:
        """Explains (frame_id, frame) pairs, from an ordinary or an async iterable,
        over one ExplainStream: `async for frame_id, result in client.explain_stream(...)`
        gives them in frame order. As `SalienceClient.explain_stream`.
        """
        return explain_stream_async(
            self._stub,
            model,
            frames,
            version=version,
            window=window,
            timeout=check_timeout(timeout),
            metadata=self._metadata,
            **options,
        )
