"""`salience audit`'s own words: the terminal summary names its statistics, and the
help is plain text in which every option says what it does and its default."""

from __future__ import annotations

import argparse

from salience_client.audit import summary_lines
from salience_client.cli.entry import build_parser
from salience_client.cli.options import connection_parser


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": sum(values) / len(values), "median": ordered[len(values) // 2]}


def test_the_summary_gives_median_energy_and_mean_areas_and_says_so() -> None:
    energy = [0.1, 0.2, 0.9]  # mean 0.4, median 0.2
    cue = [0.0, 0.05, 0.7]  # mean 0.25, median 0.05
    result = {
        "models": {
            "shapes": {
                "methods": {
                    "vanilla": {
                        "energy_object": _stats(energy),
                        "energy_cue": _stats(cue),
                        "insertion": {
                            "area": {"mean": 0.875, "median": 0.5},
                            "random_area": {"mean": 0.625, "median": 0.5},
                        },
                    }
                }
            }
        }
    }
    line = summary_lines(result)
    assert line == (
        "          shapes          vanilla: median energy on object 0.200, on cue 0.050; "
        "mean insertion area 0.875 vs random 0.625"
    )


def _audit_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    audit: argparse.ArgumentParser = commands.choices["audit"]
    return audit


def test_audit_help_is_plain_text() -> None:
    text = _audit_parser().format_help()
    assert "**" not in text
    assert "`" not in text
    assert "median energy share" in text


def test_every_audit_option_has_help_and_names_its_default() -> None:
    audit = _audit_parser()
    shared = {a.dest for a in connection_parser()._actions}
    own = [a for a in audit._actions if a.dest not in shared and a.dest != "help"]
    assert {a.dest for a in own} >= {
        "model", "data", "count", "seed", "methods", "steps", "baseline", "blur_sigma",
        "randomize_images", "batch_size", "json", "report", "plot", "no_progress",
    }  # fmt: skip
    for action in own:
        assert action.help, action.dest
        if action.required:
            assert "required" in action.help, action.dest
        else:
            assert "default" in action.help, action.dest
        if action.default not in (None, False) and not isinstance(action.default, str):
            assert f"{action.default:g}" in action.help, (action.dest, action.help)
