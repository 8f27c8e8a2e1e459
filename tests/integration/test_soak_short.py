"""The soak of tests/bench/test_soak.py for 20 s, in the test command.

A fresh `salience serve` process under a steady mixed load: no request fails, and
the server's resident memory grows by at most RSS_GROWTH_LIMIT_MB between the end
of the warm-up (5 s) and the end of the run. The limit is a memory bound, not a
timing one, and generous: runs on 2 shared cores grew by +0.5 to +8 MB (90 s:
+0.5 MB, a slope of +0.4 MB/min). What it catches in 15 s at the ~300 requests/s
this load reaches is a leak of what a request compiles or copies (a traced graph,
a derived model); a leak of a few KB per request (its inputs or maps) shows in the
slope of the long run (`make bench`, SALIENCE_SOAK_SECONDS), over minutes.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench.test_soak import build_repository, check, soak

SECONDS = 20.0
RSS_GROWTH_LIMIT_MB = 64.0


def test_a_short_soak_fails_nothing_and_grows_memory_within_bounds(tmp_path: Path) -> None:
    mlp = build_repository(tmp_path / "repo")
    figures = soak(tmp_path / "repo", mlp, SECONDS)
    check(figures)
    assert figures.growth_mb <= RSS_GROWTH_LIMIT_MB, figures.report()
