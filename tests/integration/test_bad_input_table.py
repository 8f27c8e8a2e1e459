"""The table of docs/bad-input.md and the bad-input test cases agree: every row has
a case with the same id, every case has a row, and both say the same RPC and status.
So neither can change without the other.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration import test_bad_input, test_methods_bad_input

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
# The header of the case tables, and a row: | `id` | `RPC` | field | what | `STATUS` | gist |
HEADER = "| id | RPC | field |"
ROW = re.compile(r"^\|\s*`(?P<id>[^`]+)`\s*\|(?P<cells>.*)\|\s*$")


def table() -> dict[str, tuple[str, str]]:
    """(RPC, status) by id, from every case table of the document; ids are unique."""
    rows: dict[str, tuple[str, str]] = {}
    in_table = False
    for line in DOC.read_text().splitlines():
        in_table = line.startswith(HEADER) or (in_table and line.startswith("|"))
        match = ROW.match(line) if in_table else None
        if match is None:
            continue
        cells = [cell.strip().strip("`") for cell in match["cells"].split("|")]
        assert len(cells) == 5, f"row {match['id']!r} has {len(cells) + 1} cells, not 6"
        assert match["id"] not in rows, f"row {match['id']!r} appears twice"
        rows[match["id"]] = (cells[0], cells[3])
    return rows


def cases() -> dict[str, tuple[str, str]]:
    """(RPC, status) by id, from every list of cases."""
    found: dict[str, tuple[str, str]] = {}

    def add(case_id: str, rpc: str, status: str) -> None:
        assert case_id not in found, f"case {case_id!r} is defined twice"
        found[case_id] = (rpc, status)

    for case_id, rpc, _, code, _ in test_bad_input.CASES:
        add(case_id, rpc, code.name)
    for case_id, rpc, _, _ in test_bad_input.TOLERATED:
        add(case_id, rpc, "OK")
    for case_id, _, _ in test_methods_bad_input.CASES:
        add(case_id, "Explain", "INVALID_ARGUMENT")
    return found


def test_every_row_has_a_case_and_every_case_a_row() -> None:
    rows, tested = table(), cases()
    assert sorted(set(rows) - set(tested)) == [], "rows without a test case"
    assert sorted(set(tested) - set(rows)) == [], "test cases without a row"


@pytest.mark.parametrize("case_id", sorted(cases()))
def test_row_and_case_agree_on_rpc_and_status(case_id: str) -> None:
    rows = table()
    assert case_id in rows, f"{case_id!r} has no row in {DOC.name}"
    assert rows[case_id] == cases()[case_id]


def test_the_table_covers_every_rpc_and_enough_ways_to_be_wrong() -> None:
    rows = table()
    rpcs = {rpc for rpc, _ in rows.values()}
    assert {"Predict", "Explain", "GetModelMetadata", "ListModels"} <= rpcs
    refused = [row for row in rows.values() if row[1] != "OK"]
    assert len(refused) >= 100, len(refused)


def test_readme_links_the_table() -> None:
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "(docs/bad-input.md)" in readme
