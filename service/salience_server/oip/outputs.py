"""Which outputs a ModelInfer request asks for: the model's outputs by name, and
saliency maps by the names `saliency` (the explanation's first map) and
`saliency/<grad modifier>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.v2 import grpc_service_pb2 as oip
from salience_server import convert
from salience_server.errors import InvalidArgument, allowed
from salience_server.explain import catalog
from salience_server.seam import ModelDevice

# The output that carries a saliency map, and the prefix naming its grad modifier.
SALIENCY = "saliency"
SALIENCY_PREFIX = SALIENCY + "/"


@dataclass(frozen=True)
class Wanted:
    """The outputs a request asks for, in its order: model outputs by name, maps by
    grad modifier ("" is the `saliency` output: the explanation's first map).
    """

    names: tuple[str, ...]
    model_outputs: tuple[str, ...]  # all of the model's when none are requested
    modifiers: tuple[str, ...]  # of the `saliency/<m>` outputs, in request order
    default_map: bool  # `saliency` is requested

    @property
    def explains(self) -> bool:
        return self.default_map or bool(self.modifiers)


def saliency_outputs() -> list[str]:
    """Every saliency output name: the default map, then one per grad modifier."""
    return [SALIENCY, *(SALIENCY_PREFIX + m for m in catalog.grad_modifiers())]


def requested_outputs(request: oip.ModelInferRequest, runtime: ModelDevice) -> Wanted:
    """Which outputs to return; a model output of the same name wins over a map's."""
    model = [info.name for info in runtime.outputs]
    outputs = request.outputs
    if not outputs:
        return Wanted(tuple(model), tuple(model), (), False)
    limit = len(model) + 1 + len(catalog.grad_modifiers())
    if len(outputs) > limit:
        raise InvalidArgument(
            f"outputs has {len(outputs)} entries, but model {runtime.name!r} has {limit} "
            "outputs to request: list each once"
        )
    names: list[str] = []
    modifiers: list[str] = []
    default_map = False
    for k, output in enumerate(outputs):
        name = output.name
        convert.check_name(f"outputs[{k}].name", name)
        if name in names:
            raise InvalidArgument(f"outputs[{k}].name={name!r} is requested twice: list it once")
        if output.parameters:
            key = sorted(output.parameters)[0]
            convert.check_name(f"outputs[{k}].parameters key", key)
            raise InvalidArgument(
                f"outputs[{k}].parameters[{key!r}] is not supported: salience takes no output "
                "parameters (nor classification or shared memory)"
            )
        if name in model:
            pass
        elif name == SALIENCY:
            default_map = True
        elif (
            name.startswith(SALIENCY_PREFIX)
            and name[len(SALIENCY_PREFIX) :] in catalog.grad_modifiers()
        ):
            modifiers.append(name[len(SALIENCY_PREFIX) :])
        else:
            raise InvalidArgument(
                f"outputs[{k}].name={name!r} is not an output of model {runtime.name!r}: use "
                f"one of {allowed(model)}, or a saliency map: {allowed(saliency_outputs())}"
            )
        names.append(name)
    return Wanted(
        tuple(names), tuple(n for n in names if n in model), tuple(modifiers), default_map
    )
