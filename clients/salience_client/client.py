"""The blocking client: numpy arrays in, typed results with numpy arrays out.

    with SalienceClient("localhost:50051") as client:
        result = client.explain("shapes", images, filter_indices=[2])
        heatmaps = result.maps["absolute"]

From a production backend: TLS (mutual, with a client certificate), a bearer token,
client-side round robin over every replica a headless Service resolves to, and a
deadline of 2 s per call, retried on UNAVAILABLE and RESOURCE_EXHAUSTED:

    client = SalienceClient(
        "dns:///salience-headless.ml.svc:50051",
        tls=TLS.from_files(ca="ca.pem", cert="client.pem", key="client.key"),
        token=Path("/var/run/secrets/salience/token").read_text().strip(),
        timeout=2.0,
    )

`salience_client.aio.AsyncSalienceClient` has the same API for asyncio. The
channel's retries, keep-alive and load balancing are in `salience_client.channel`.
Imports grpcio, protobuf and numpy only — never TensorFlow.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from typing import Any

import grpc

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client.channel import (
    DEFAULT,
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_SECONDS,
    TLS,
    ChannelConfig,
    Keepalive,
    RetryPolicy,
    Timeout,
    check_timeout,
    default_target,
    resolve_timeout,
)
from salience_client.messages import (
    Inputs,
    explanation_request,
    explanation_result,
    predict_request,
    prediction_result,
)
from salience_client.results import (
    Explanation,
    Objective,
    Prediction,
    ResolvedExplanation,
    ResolvedObjective,
    SalienceError,
)
from salience_client.stream import explain_stream

__all__ = [
    "DEFAULT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT_SECONDS",
    "Explanation",
    "Inputs",
    "Objective",
    "Prediction",
    "ResolvedExplanation",
    "ResolvedObjective",
    "SalienceClient",
    "SalienceError",
    "explanation_request",
    "explanation_result",
    "predict_request",
    "prediction_result",
]


class ClientBase:
    """What the blocking and the asyncio client share: the channel's configuration,
    the default deadline and the metadata of every call (see `SalienceClient`).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        tls: TLS | bool | None = None,
        token: str | None = None,
        allow_plaintext_token: bool = False,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        keepalive: Keepalive | None = DEFAULT_KEEPALIVE,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        channel: Any = None,
    ) -> None:
        target = default_target() if target is None else target
        self.target = target
        self.timeout = check_timeout(timeout)
        if tls is True:
            security: TLS | None = TLS()
        else:
            security = tls if isinstance(tls, TLS) else None
        self.config = ChannelConfig(
            target=target,
            tls=security,
            token=token,
            allow_plaintext_token=allow_plaintext_token,
            retry=retry,
            keepalive=keepalive,
            load_balancing=load_balancing,
            max_message_bytes=max_message_bytes,
            extra_options=tuple(options),
        )
        self._metadata = self.config.call_metadata()
        self._channel = channel if channel is not None else self._open()
        # The generated stub takes a blocking or an asyncio channel alike.
        self._stub = salience_pb2_grpc.SalienceStub(self._channel)

    def _open(self) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        # Never the token.
        return f"{type(self).__name__}({self.target!r}, tls={self.config.tls is not None})"

    def _call_kwargs(self, timeout: Timeout) -> dict[str, Any]:
        """`timeout` and `metadata` of a stub call, from a method's `timeout=`."""
        return {"timeout": resolve_timeout(timeout, self.timeout), "metadata": self._metadata}


class SalienceClient(ClientBase):
    """A blocking client, safe to share between threads.

    `target` is the server's address; None (the default) means $SALIENCE_TARGET,
    else localhost:50051.

    Every call has a deadline: the client's `timeout` (60 s by default; None: no
    deadline), or a method's own `timeout=` — seconds, None for no deadline at all,
    or `DEFAULT` (the default) for the client's. Calls that fail with UNAVAILABLE
    or RESOURCE_EXHAUSTED are retried inside that deadline (`retry`, None: never);
    every other failure raises SalienceError at once.

    `tls`: a `TLS` (or True for the system's trusted roots) to verify the server,
    with a client certificate for mutual TLS; `token` is sent as
    `authorization: Bearer <token>` with every call (refused over plaintext to
    another machine unless `allow_plaintext_token`). `load_balancing` is
    "round_robin" over every address the target resolves to, or "pick_first";
    `keepalive` the connection's pings. `options` are extra gRPC channel
    arguments; `channel` replaces the channel built from all of these (the token
    and the deadlines still apply).
    """

    def _open(self) -> grpc.Channel:
        return self.config.open()

    def __enter__(self) -> SalienceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: Timeout) -> Any:
        kwargs = self._call_kwargs(timeout)
        try:
            return method(request, **kwargs)
        except grpc.RpcError as err:
            raise SalienceError.from_rpc_error(err, kwargs["timeout"]) from None

    def predict(
        self, model: str, inputs: Inputs, *, version: int = 0, timeout: Timeout = DEFAULT
    ) -> Prediction:
        """The model's outputs for a batch (first axis) of inputs."""
        request = predict_request(model, inputs, version=version)
        return prediction_result(self._call(self._stub.Predict, request, timeout))

    def explain(
        self, model: str, inputs: Inputs, *, timeout: Timeout = DEFAULT, **options: Any
    ) -> Explanation:
        """Predictions and saliency maps; options as in `explanation_request`."""
        request = explanation_request(model, inputs, **options)
        return explanation_result(self._call(self._stub.Explain, request, timeout))

    def metadata(
        self, model: str, *, version: int = 0, timeout: Timeout = DEFAULT
    ) -> pb.ModelMetadata:
        """Versions, inputs, outputs, layers and supported options of one model."""
        request = pb.GetModelMetadataRequest(model=pb.ModelSpec(name=model, version=version))
        return self._call(self._stub.GetModelMetadata, request, timeout)

    def list_models(self, *, timeout: Timeout = DEFAULT) -> list[pb.ModelMetadata]:
        """Every served model with its versions, inputs and outputs."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    def explain_stream(
        self,
        model: str,
        frames: Iterable[tuple[Any, Any]],
        *,
        version: int = 0,
        window: int = 0,
        timeout: float | None = None,
        **options: Any,
    ) -> Generator[tuple[Any, Explanation], None, None]:
        """Explains (frame_id, frame) pairs over one ExplainStream; yields
        (frame_id, Explanation) in frame order. A frame is one sample without the
        batch axis; `timeout` bounds the whole stream (None, the default: no
        deadline). See `salience_client.stream`.
        """
        return explain_stream(
            self._stub,
            model,
            frames,
            version=version,
            window=window,
            timeout=check_timeout(timeout),
            metadata=self._metadata,
            **options,
        )
