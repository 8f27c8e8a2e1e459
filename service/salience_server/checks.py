"""Request inputs checked against a model's input specs: numpy only, on the event
loop (no TensorFlow, no thread hop), before a request is queued.
"""

from __future__ import annotations

import numpy as np

from salience_server.errors import InvalidArgument, allowed
from salience_server.seam import ModelDevice


def check_inputs(
    model: ModelDevice,
    arrays: dict[str, np.ndarray],
    max_batch: int,
    max_free_axis: int | None = None,
) -> list[np.ndarray]:
    """Orders request inputs by the model's inputs and checks each against its spec.

    Keys are input names; a single unnamed ("") input is accepted for a model
    with one input; an axis the model leaves free may be at most `max_free_axis`
    long. Raises InvalidArgument naming the field and what is allowed.
    """
    capped = model.config.limits.batch_size(max_batch)
    whose = "the model's" if capped < max_batch else "the server's"
    max_batch = capped
    names = [info.name for info in model.inputs]
    if len(model.inputs) == 1 and set(arrays) == {""}:
        arrays = {names[0]: arrays[""]}
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise InvalidArgument(
            f"inputs name {allowed(unknown)} not an input of model {model.name!r}: "
            f"its inputs are {allowed(names)}"
        )
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidArgument(
            f"inputs lack {allowed(missing)}: model {model.name!r} takes {allowed(names)}"
        )
    ordered = []
    batch = None
    for info in model.inputs:
        array = arrays[info.name]
        field = f"inputs[{info.name!r}]"
        expected = ["N", *(d if d is not None else "any" for d in info.shape[1:])]
        if array.dtype != np.dtype(info.dtype):
            # Besides the model's own, the dtypes its config.toml accepts on the wire
            # ([inputs.<name>] wire_dtypes), cast on the device.
            accepted = (info.dtype, *model.config.input_config(info.name).wire_dtypes)
            if array.dtype.name not in accepted[1:]:
                raise InvalidArgument(
                    f"{field}.dtype={array.dtype} is not accepted: input {info.name!r} of "
                    f"model {model.name!r} takes {' or '.join(accepted)}"
                )
        if array.ndim != len(info.shape):
            raise InvalidArgument(
                f"{field}.shape={list(array.shape)} has rank {array.ndim}: input "
                f"{info.name!r} takes rank {len(info.shape)} (batch first), shape {expected}"
            )
        for axis, (got, want) in enumerate(zip(array.shape[1:], info.shape[1:], strict=True)):
            if want is not None and got != want:
                raise InvalidArgument(
                    f"{field}.shape[{axis + 1}]={got} does not match: input {info.name!r} "
                    f"takes shape {expected}"
                )
            # A free axis bounds the work only by the message size otherwise.
            if want is None and max_free_axis is not None and got > max_free_axis:
                raise InvalidArgument(
                    f"{field}.shape[{axis + 1}]={got} is over the server's "
                    f"max_free_axis_size={max_free_axis}: input {info.name!r} takes shape "
                    f"{expected} with at most {max_free_axis} along each free axis"
                )
            # A free axis of size 0 passes the spec, but no layer computes on it.
            if got == 0:
                raise InvalidArgument(
                    f"{field}.shape[{axis + 1}]=0 is empty: input {info.name!r} takes "
                    f"shape {expected} with at least one value along every axis"
                )
        if array.shape[0] == 0:
            raise InvalidArgument(f"{field} is an empty batch: send at least one sample")
        if array.shape[0] > max_batch:
            raise InvalidArgument(
                f"{field} has a batch of {array.shape[0]}, over {whose} "
                f"max_batch_size={max_batch}: split it into smaller requests"
            )
        if batch is not None and array.shape[0] != batch:
            raise InvalidArgument(
                f"{field} has batch {array.shape[0]} but an earlier input has {batch}: "
                "every input needs the same batch size"
            )
        batch = array.shape[0]
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)))[0][0])
            raise InvalidArgument(
                f"{field} holds NaN or infinite values (first in sample {bad}): "
                "only finite values are accepted"
            )
        ordered.append(array)
    return ordered
