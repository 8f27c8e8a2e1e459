"""The core's messages in this protocol's words: the core names the Salience API's
fields (`model.name`, `explanation.samples`); a ModelInfer caller sent
`model_name` and `parameters['samples']`, so its errors say those.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from salience_server.errors import ServiceError

# The Salience field names the core's messages use, and their names here. The
# explanation's fields are request parameters (`ExplanationParameters`).
# Each pattern's group 1 is the parameter's name.
_EXPLANATION_RENAMES = (
    # The target resolver names objectives without the `explanation.` prefix.
    re.compile(r"(?:\bexplanation\.|\b)objectives\[0\]\.(layer|filter_indices)(?:\.name|\.index)?"),
    re.compile(r"\bexplanation\.(wrt|penultimate_layer)(?:\.name|\.index)?"),
    re.compile(r"\bexplanation\.(grad_modifiers)(?:\[\d+\])?"),
    re.compile(
        r"\bexplanation\.(method|backprop_modifier|seed|samples|noise|steps|keepdims|"
        r"chunk_size|top_channels|window|stride|occlusion_value|"
        r"normalize|keep_activation|output_dtype|input|output)\b"
    ),
    re.compile(
        r"\bexplanation\.(blur_max_sigma|blur_grad_step|guided_fraction|guided_max_dist|"
        r"xrai_scales|xrai_sigma|xrai_min_size|xrai_dilation_radius|xrai_area_threshold)\b"
    ),
)


def _as_parameter(match: re.Match[str]) -> str:
    return f"parameters[{match.group(1)!r}]"


def _rename(message: str, name_field: str, version_field: str) -> str:
    message = re.sub(r"\bmodel\.name\b", name_field, message)
    message = re.sub(r"\bmodel\.version\b", version_field, message)
    # explanation.randomization.layers / .seed are the parameters randomize_layers / _seed.
    message = re.sub(
        r"\bexplanation\.randomization\.(layers|seed)\b",
        lambda m: f"parameters['randomize_{m.group(1)}']",
        message,
    )
    message = message.replace("(or 0 for the highest)", "(or '' for the highest)")
    for pattern in _EXPLANATION_RENAMES:
        message = pattern.sub(_as_parameter, message)
    return message


@contextmanager
def protocol_words(name_field: str, version_field: str) -> Iterator[None]:
    """Re-raises the core's ServiceErrors with this protocol's field names."""
    try:
        yield
    except ServiceError as err:
        message = _rename(err.message, name_field, version_field)
        if message == err.message:
            raise
        raise type(err)(message, err.code) from None
