"""The checks that run on a request before any model is asked: names no longer than a
name can be, lists no longer than the caps (refused before they are read), weights
and noise that fit float32; the interceptor's parsing of request bytes and its cap
on status messages; and the `max_filter_indices` setting.
"""

from __future__ import annotations

import pytest

from salience.v1 import salience_pb2 as pb
from salience_server import convert, errors
from salience_server.errors import InvalidArgument
from salience_server.explain.options import Limits
from salience_server.settings import Settings, SettingsError

LIMITS = Limits(max_objectives=2, max_filter_indices=3)


def refusal(explanation: pb.Explanation, limits: Limits | None = LIMITS) -> str:
    with pytest.raises(InvalidArgument) as err:
        convert.explain_options(explanation, limits)
    return err.value.message


def test_names_up_to_the_limit_pass_and_longer_ones_are_refused_unechoed() -> None:
    convert.check_name("explanation.method", "m" * convert.MAX_NAME_CHARS)
    with pytest.raises(InvalidArgument) as err:
        convert.check_name("explanation.method", "m" * (convert.MAX_NAME_CHARS + 1))
    assert err.value.message == (
        "explanation.method has 257 characters, longer than any name: use at most 256"
    )


@pytest.mark.parametrize(
    ("explanation", "message"),
    [
        (
            pb.Explanation(objectives=[pb.Objective()] * 3),
            "explanation.objectives has 3 entries, over the server's max_objectives=2",
        ),
        (
            pb.Explanation(objectives=[pb.Objective(), pb.Objective(filter_indices=[0] * 4)]),
            "explanation.objectives[1].filter_indices has 4 entries, over the server's "
            "max_filter_indices=3: list each unit once, or none for the mean of the whole layer",
        ),
        (
            pb.Explanation(grad_modifiers=["none"] * 100),
            "explanation.grad_modifiers has 100 entries, but there are",
        ),
        (
            pb.Explanation(objectives=[pb.Objective(layer=pb.LayerRef(name="l" * 300))]),
            "explanation.objectives[0].layer.name has 300 characters",
        ),
        (
            pb.Explanation(penultimate_layer=pb.LayerRef(name="p" * 300)),
            "explanation.penultimate_layer.name has 300 characters",
        ),
        (pb.Explanation(output="o" * 300), "explanation.output has 300 characters"),
        (
            pb.Explanation(objectives=[pb.Objective(weight=3.5e38)]),
            "explanation.objectives[0].weight=3.5e+38 is not allowed: use a finite value of "
            "magnitude at most 3.402823e+38 (scores are float32)",
        ),
        (pb.Explanation(noise=3.5e38), "explanation.noise=3.5e+38 is not allowed"),
    ],
)
def test_explanations_over_the_limits_are_refused(
    explanation: pb.Explanation, message: str
) -> None:
    assert refusal(explanation).startswith(message)


def test_without_limits_only_the_model_checks_count_entries() -> None:
    # The stream path converts first; the runtime's check_options applies the caps.
    options = convert.explain_options(pb.Explanation(objectives=[pb.Objective()] * 3), None)
    assert len(options.objectives) == 3


def test_values_at_the_limits_are_accepted() -> None:
    largest = float.fromhex("0x1.fffffep+127")  # float32's largest value
    explanation = pb.Explanation(
        objectives=[pb.Objective(filter_indices=[0, 1, 2], weight=-largest), pb.Objective()],
        grad_modifiers=["none", "absolute"],
        noise=largest,
    )
    options = convert.explain_options(explanation, LIMITS)
    assert options.objectives[0].filter_indices == (0, 1, 2)
    assert options.objectives[0].weight == -largest
    assert (options.noise, options.grad_modifiers) == (largest, ("none", "absolute"))


def test_too_many_input_tensors_are_refused_before_decoding() -> None:
    with pytest.raises(InvalidArgument) as err:
        convert.request_inputs([pb.Tensor(name=str(k)) for k in range(convert.MAX_INPUTS + 1)])
    assert err.value.message == "inputs has 1025 tensors: send one per model input, at most 1024"


def test_status_messages_are_cut_to_fit_a_header() -> None:
    assert errors._fit("short") == "short"
    cut = errors._fit("é" * 5000)  # two bytes each: cut inside a character
    assert cut.endswith(" …")
    assert len(cut[:-2].encode()) <= errors.MAX_DETAILS_BYTES
    assert set(cut[:-2]) == {"é"}


def test_request_bytes_that_are_no_message_are_invalid_arguments() -> None:
    request = pb.ModelSpec(name="linear", version=3).SerializeToString()
    assert errors._parse(pb.ModelSpec.FromString, request) == pb.ModelSpec(name="linear", version=3)
    with pytest.raises(
        InvalidArgument, match=r"not a valid protobuf message.*salience\.v1\.ModelSpec"
    ):
        errors._parse(pb.ModelSpec.FromString, b"\xff\xff")


def test_max_filter_indices_setting() -> None:
    assert Settings().max_filter_indices == 4096
    assert Settings(max_filter_indices=7).limits.max_filter_indices == 7
    assert Settings.load(environ={"SALIENCE_MAX_FILTER_INDICES": "9"}).max_filter_indices == 9
    with pytest.raises(SettingsError, match="max_filter_indices=0 must be at least 1"):
        Settings(max_filter_indices=0)
