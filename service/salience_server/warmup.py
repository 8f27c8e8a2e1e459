"""Warm-up: a model version's functions traced (and with XLA compiled, on a GPU
their kernels chosen) at every batch bucket before it is reported ready, so that
no request pays for a trace.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from salience_server.errors import ResourceExhausted, ServiceError
from salience_server.explain.options import ExplainOptions
from salience_server.model_config import ExplainDefaults

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

log = logging.getLogger("salience_server.runtime")

# Sizes tried in turn for input axes a model leaves free (None) at warm-up: small
# enough to be cheap, large enough for a few valid convolutions and poolings.
WARM_UP_SIZES = (32, 64, 128, 224)


def default_explanations(runtime: ModelRuntime) -> list[ExplainOptions]:
    """What warm-up explains: an explanation request that sets nothing (so the
    model's configured defaults choose the method and its options), of the first
    floating-point input. Extend this list to warm up more methods.
    """
    floats = [info.name for info in runtime.inputs if np.dtype(info.dtype).kind == "f"]
    if not floats:
        return []
    return [
        ExplainOptions(
            input_name=floats[0] if len(runtime.inputs) > 1 else "",
            unset=frozenset(f.name for f in dataclasses.fields(ExplainDefaults)),
        )
    ]


def warm_up(
    runtime: ModelRuntime,
    buckets: Sequence[int] = (1,),
    explanations: Sequence[ExplainOptions] | None = None,
) -> None:
    """Runs predict and each default explanation once at every batch size of
    `buckets` (the sizes the batcher pads device calls to), so that the first
    request of each finds its functions traced, and with XLA compiled for its
    shape, and on a GPU its kernels chosen.

    Input axes the model leaves free (None) take the first of `WARM_UP_SIZES`
    the model accepts; when none fits, warm-up is skipped with a log line and
    the first requests trace instead. An explanation the model cannot give (a
    ServiceError, such as a CAM method without a spatial layer) is logged and
    left out; a predict that runs out of device memory ends warm-up with a log
    line; any other failing predict raises: the model cannot serve.
    """
    sample = _warm_up_sample(runtime)
    if sample is None:
        return
    chosen = list(default_explanations(runtime) if explanations is None else explanations)
    placed: set[str] = set()
    # Inputs a config.toml accepts in other dtypes on the wire (uint8 images) have
    # compiled functions of their own (the cast in front): warmed alike.
    variants = runtime.wire.variants()
    for size in sorted(set(buckets)):
        native = [np.repeat(x, size, axis=0) for x in sample]
        batches = [native] + [
            [x.astype(dtype) for x, dtype in zip(native, dtypes, strict=True)]
            for dtypes in variants
        ]
        for batch in batches:
            try:
                runtime.predict(batch)
            except ResourceExhausted:
                # The model serves; calls this large will fail alike until the
                # device batch size is lowered.
                log.warning(
                    "model %s: the device ran out of memory warming up batch %d: larger "
                    "buckets are not warmed; lower max_device_batch_size",
                    runtime.name,
                    size,
                )
                return
            for options in list(chosen):
                try:
                    plan = runtime.plan(options, size)
                    outputs, raw = runtime.compute(plan.graph, batch, plan.params)
                    runtime.finish(plan, outputs, raw)
                    if plan.graph.method not in placed and raw:
                        # Evidence of where explanations run, next to the weights' line.
                        placed.add(plan.graph.method)
                        log.info(
                            "model %s: %s computed on %s",
                            runtime.name,
                            plan.graph.method,
                            next(iter(raw.values())).device,
                        )
                except ServiceError as err:
                    log.warning(
                        "model %s: warm-up leaves out explanation %r: %s",
                        runtime.name,
                        options.method,
                        err,
                    )
                    chosen.remove(options)


def _warm_up_sample(runtime: ModelRuntime) -> list[np.ndarray] | None:
    """One all-zeros sample per input, free axes filled with a size that works."""
    free = any(d is None for info in runtime.inputs for d in info.shape[1:])
    failures = []
    for size in WARM_UP_SIZES if free else (0,):
        sample = [
            np.zeros([1, *(size if d is None else d for d in info.shape[1:])], info.dtype)
            for info in runtime.inputs
        ]
        if not free:
            runtime.predict(sample)
            return sample
        try:
            runtime.predict(sample)
        except Exception as err:  # a size this model cannot take: try the next
            failures.append(f"{size}: {type(err).__name__}")
            continue
        log.info("model %s: warming up with free input axes of size %d", runtime.name, size)
        return sample
    log.warning(
        "model %s: warm-up skipped: its free input axes take none of the sizes %s (%s); "
        "the first request of each shape traces its functions",
        runtime.name,
        ", ".join(map(str, WARM_UP_SIZES)),
        "; ".join(failures),
    )
    return None
