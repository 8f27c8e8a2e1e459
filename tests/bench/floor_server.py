"""The floor of Python gRPC: a bare `grpc.aio` server answering Salience's Predict and
Explain with nothing but the protocol's own work, to measure the service against.

    python tests/bench/floor_server.py PORT_FILE [--map-shape 64,64]

Each handler parses the request (the same bytes the service gets), decodes its first
input tensor with `np.frombuffer` and answers with a reply of the same size the
service sends for one sample: Predict a small output tensor, Explain the outputs and
one float32 map of `--map-shape`. No interceptor, no metrics, no model: whatever the
service spends beyond this and its model is the host path's overhead.

The bound port is written to PORT_FILE once the server serves.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import numpy as np
from grpc import aio

from salience.v1 import salience_pb2 as pb

OUTPUT_UNITS = 10


def _decode(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape))


def _tensor(array: np.ndarray, name: str = "") -> pb.Tensor:
    return pb.Tensor(name=name, dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())


async def serve(port_file: Path, map_shape: tuple[int, ...], output_units: int) -> None:
    outputs = _tensor(np.zeros((1, output_units), np.float32), "output")
    saliency = pb.SaliencyMap(grad_modifier="absolute", map=_tensor(np.zeros(map_shape, "<f4")))

    async def predict(raw: bytes, context: aio.ServicerContext) -> bytes:
        request = pb.PredictRequest.FromString(raw)
        rows = _decode(request.inputs[0])
        response = pb.PredictResponse(
            model=pb.ModelSpec(name=request.model.name, version=1), outputs=[outputs]
        )
        assert rows.size
        return response.SerializeToString()

    async def explain(raw: bytes, context: aio.ServicerContext) -> bytes:
        request = pb.ExplainRequest.FromString(raw)
        rows = _decode(request.inputs[0])
        response = pb.ExplainResponse(
            model=pb.ModelSpec(name=request.model.name, version=1),
            outputs=[outputs],
            maps=[saliency],
        )
        assert rows.size
        return response.SerializeToString()

    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(predict),
        "Explain": grpc.unary_unary_rpc_method_handler(explain),
    }
    server = aio.server(
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("salience.v1.Salience", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The port, for the benchmark that started this process (written once, tiny).
    port_file.write_text(str(port))  # noqa: ASYNC240
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--map-shape", default="1,64,64")
    parser.add_argument("--output-units", type=int, default=OUTPUT_UNITS)
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.map_shape.split(","))
    asyncio.run(serve(args.port_file, shape, args.output_units))


if __name__ == "__main__":
    main()
