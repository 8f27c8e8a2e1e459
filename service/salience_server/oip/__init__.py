"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`),
served on the same port as `salience.v1.Salience`, so that Triton's and KServe's
clients and tools work unchanged.

A ModelInfer request is checked like a Predict (the same shape, byte-length and
input checks), goes through the same core, batcher and model runtime, and asks for
saliency maps by naming extra outputs (`saliency`, `saliency/<grad modifier>`) with
the explanation options as request parameters, which become an `Explanation`
checked exactly as Explain's. docs/oip.md documents every name, parameter and
status. One module per role:

- `codec`: the protocol's tensors ⇄ numpy arrays, datatypes, tensor metadata;
- `outputs`: which model outputs and saliency maps a request asks for;
- `parameters`: request parameters → an `Explanation`;
- `words`: the core's messages in this protocol's field names;
- `servicer`: the six RPCs — decode, await the core, encode.

Errors are ServiceErrors, reported by the interceptor in `errors` like every
RPC's; messages name this protocol's fields (`model_name`, `inputs[0].datatype`,
`raw_input_contents[1]`, `parameters['samples']`).
"""

from salience_server.oip.codec import CONTENTS, INPUT_DATATYPES, datatype, request_inputs
from salience_server.oip.servicer import SERVICE_NAME, OipServicer

__all__ = [
    "CONTENTS",
    "INPUT_DATATYPES",
    "SERVICE_NAME",
    "OipServicer",
    "datatype",
    "request_inputs",
]
