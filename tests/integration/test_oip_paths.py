"""Blur IG, Guided IG and XRAI through the Open Inference Protocol: their request
parameters give the maps `Explain` gives with the same options, and bad values are
refused in this protocol's words."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from inference.v2 import grpc_service_pb2_grpc
from tests.conftest import RunningServer
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE, build_repository
from tests.integration.test_oip import raw_outputs, raw_request


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> RunningServer:
    repo: Path = build_repository(tmp_path_factory.mktemp("oip-paths-repo"))
    running: RunningServer = server_factory(repo)
    return running


@pytest.fixture(scope="module")
def stub(served: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(served.target) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


# Guided IG of a linear score is x ⊙ w on every path: it is checked on the smooth
# (float64) model, where its parameters change the map.
MODELS = {"blur-ig": "linear", "guided-ig": "smooth", "xrai": "linear"}


def inputs_of(model: str) -> np.ndarray:
    if model == "smooth":
        return np.random.default_rng(4).uniform(-1, 1, (2, *SMOOTH_SHAPE))
    return x()


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "blur-ig",
        {"steps": 6, "blur_max_sigma": 2.5, "blur_grad_step": "0.05"},
        {"steps": 6, "blur_max_sigma": 2.5, "blur_grad_step": 0.05},
    ),
    (
        "guided-ig",
        {"steps": 6, "guided_fraction": "0.5", "guided_max_dist": 0.1},
        {"steps": 6, "guided_fraction": 0.5, "guided_max_dist": 0.1},
    ),
    (
        "xrai",
        {
            "steps": 4,
            "xrai_scales": "100,300",
            "xrai_sigma": 0.5,
            "xrai_min_size": 40,
            "xrai_dilation_radius": 1,
            "xrai_area_threshold": "0.5",
        },
        {
            "steps": 4,
            "xrai_scales": [100.0, 300.0],
            "xrai_sigma": 0.5,
            "xrai_min_size": 40,
            "xrai_dilation_radius": 1,
            "xrai_area_threshold": 0.5,
        },
    ),
]


@pytest.mark.parametrize(("method", "parameters", "options"), CASES, ids=[c[0] for c in CASES])
def test_path_parameters_reach_explain(
    served: RunningServer, stub: Any, method: str, parameters: dict[str, Any], options: Any
) -> None:
    model = MODELS[method]
    inputs = inputs_of(model)
    request = raw_request(
        model,
        {"x": inputs},
        ("saliency",),
        method=method,
        filter_indices="2",
        normalize=False,
        **parameters,
    )
    got = raw_outputs(stub.ModelInfer(request, timeout=120))["saliency"]
    with served.client() as client:
        want = client.explain(
            model, inputs, method=method, filter_indices=[2], normalize=False, **options
        )
        # Other values of the same parameters give other maps: they were not dropped.
        if method != "xrai":  # a 6x5 image is one region to XRAI whatever its options
            steps = options["steps"]
            default = client.explain(
                model, inputs, method=method, filter_indices=[2], normalize=False, steps=steps
            )
            assert not np.allclose(default.maps[want.resolved.grad_modifiers[0]], got)
    np.testing.assert_allclose(
        got, want.maps[want.resolved.grad_modifiers[0]], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "blur_max_sigma",
            0.0,
            "parameters['blur_max_sigma']=0 is out of range: use 0 < blur_max_sigma <= 1000",
        ),
        ("guided_fraction", "many", "parameters['guided_fraction']='many' is not a number"),
        (
            "xrai_scales",
            "100,x",
            "parameters['xrai_scales']='100,x' is not a list of numbers: use e.g. '50,100,150'",
        ),
        (
            "xrai_min_size",
            -1,
            "parameters['xrai_min_size']=-1 is not allowed: use a whole number from 0 to",
        ),
    ],
)
def test_bad_path_parameters_are_refused(stub: Any, name: str, value: Any, message: str) -> None:
    method = name.split("_")[0].replace("blur", "blur-ig").replace("guided", "guided-ig")
    request = raw_request("linear", {"x": x()}, ("saliency",), method=method, **{name: value})
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(message), caught.value.details()
