"""Drives a salience server with Triton's official `tritonclient` gRPC client, as a
Triton or KServe user would, and reports what it saw.

Runs inside its own virtual environment (`.venv-oip`, made by `make install-test`),
never the project's: tritonclient pins protobuf below 7, the project's stubs need 7.
So it imports nothing of salience. tests/integration/test_oip_tritonclient.py runs it:

    .venv-oip/bin/python tests/e2e/oip_client_script.py TARGET WORKDIR

WORKDIR holds `x.npy` (a float32 batch for the `linear` model) and receives one .npy
file per array the server answered; a JSON object of everything else goes to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

# The explanation the test compares with its own Explain: SmoothGrad with a fixed
# seed, so both sides compute the same noise; noise as a float (double_param).
EXPLANATION: dict[str, Any] = {
    "method": "smoothgrad",
    "filter_indices": "1,3",
    "samples": 4,
    "noise": 0.25,
    "seed": 11,
}


def tensor_metadata(tensors: Any) -> list[list[Any]]:
    return [[t.name, t.datatype, list(t.shape)] for t in tensors]


def error(call: Any) -> dict[str, str]:
    """The status and message of a call that must fail."""
    try:
        call()
    except InferenceServerException as err:
        return {"status": str(err.status()), "message": str(err.message())}
    raise SystemExit("the call succeeded where the server must refuse it")


def main(target: str, workdir: Path) -> dict[str, Any]:
    x = np.load(workdir / "x.npy")
    client = triton.InferenceServerClient(url=target)
    report: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("linear"),
        "model_ready_version_1": client.is_model_ready("linear", model_version="1"),
        "model_ready_unknown": client.is_model_ready("nope"),
    }
    server = client.get_server_metadata()
    report["server_metadata"] = {
        "name": server.name,
        "version": server.version,
        "extensions": list(server.extensions),
    }
    model = client.get_model_metadata("linear")
    report["model_metadata"] = {
        "name": model.name,
        "versions": list(model.versions),
        "platform": model.platform,
        "inputs": tensor_metadata(model.inputs),
        "outputs": tensor_metadata(model.outputs),
    }

    # Raw (binary) inputs: set_data_from_numpy fills raw_input_contents.
    infer_input = triton.InferInput("x", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    result = client.infer("linear", [infer_input], request_id="raw-1")
    response = result.get_response()
    report["raw"] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": tensor_metadata(response.outputs),
    }
    np.save(workdir / "raw_logits.npy", result.as_numpy("logits"))

    # Typed inputs: the request built with tritonclient's own generated stubs, values
    # in fp32_contents, sent with its stub; the answer comes back typed as well.
    request = service_pb2.ModelInferRequest(model_name="linear", id="typed-1")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(target) as channel:
        typed = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    report["typed"] = {
        "id": typed.id,
        "raw_output_contents": len(typed.raw_output_contents),
        "outputs": tensor_metadata(typed.outputs),
    }
    logits = np.array(typed.outputs[0].contents.fp32_contents, np.float32)
    np.save(workdir / "typed_logits.npy", logits.reshape(list(typed.outputs[0].shape)))

    # A saliency map through the standard protocol: an extra output, options as
    # request parameters.
    outputs = [triton.InferRequestedOutput(name) for name in ("saliency", "saliency/negate")]
    result = client.infer("linear", [infer_input], outputs=outputs, parameters=EXPLANATION)
    response = result.get_response()
    report["saliency"] = {
        "outputs": tensor_metadata(response.outputs),
        "method": response.parameters["method"].string_param,
        "seed": response.parameters["seed"].int64_param,
    }
    np.save(workdir / "saliency.npy", result.as_numpy("saliency"))
    np.save(workdir / "saliency_negate.npy", result.as_numpy("saliency/negate"))

    # Refusals, as tritonclient reports them.
    report["unknown_model"] = error(lambda: client.infer("nope", [infer_input]))
    wrong = triton.InferInput("x", list(x.shape), "FP64")
    wrong.set_data_from_numpy(x.astype(np.float64))
    report["wrong_datatype"] = error(lambda: client.infer("linear", [wrong]))
    report["unknown_parameter"] = error(
        lambda: client.infer(
            "linear", [infer_input], outputs=outputs[:1], parameters={"temperature": 2}
        )
    )
    client.close()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
