"""The README's raw-stub example runs as written against the bundled demo models,
and its printed values are the ones the Python client gets for the same request.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import RunningServer

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- raw-stub-example:"


def readme_example() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost its raw-stub example"
    after = text.split(MARKER, 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_raw_stub_example_runs_and_matches_the_client(demo_server: RunningServer) -> None:
    served = demo_server
    code = readme_example()
    assert "salience_client" not in code  # the point: stubs alone
    assert code.count('"localhost:50051"') == 1
    namespace: dict[str, Any] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace("localhost:50051", served.target), "README", "exec"), namespace)
    maps = namespace["maps"]
    response = namespace["response"]
    assert maps.shape == (2, 64, 64)
    images = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    with served.client() as client:
        expected = client.explain("shapes", images, filter_indices=[2], grad_modifiers=["absolute"])
    np.testing.assert_allclose(maps, expected.maps["absolute"], rtol=1e-5, atol=1e-6)
    assert list(response.labels) == expected.labels
    assert printed.getvalue().strip() == f"{list(response.labels)} (2, 64, 64)"
