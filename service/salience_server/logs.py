"""Logs that an attacker cannot flood: repeated warnings are rate-limited.

A flood of unauthenticated calls, or of requests refused for a full queue, would
otherwise write one WARNING per call (hundreds of KiB a second), drowning what
matters and filling disks. `RepeatLimiter` is a logging filter: of the records at
WARNING and above that repeat — the same logger, level and message template, so
`refused %s from %s: %s` from a thousand peers is one kind — the first `burst` of
each `window` seconds pass; the rest are counted, not written. When the window
ends, one line says how many were left out (`flush`, called as the window
passes, by a periodic task of the server, and at exit), so nothing goes unseen:

    WARNING salience_server.security: 4871 more like "refused %s from %s: %s" in
    the last 60 s were not logged

Records below WARNING pass untouched (the server logs no INFO line per call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SUMMARY = '%d more like "%s" in the last %g s were not logged'


@dataclass
class _Kind:
    """The records of one kind in the current window."""

    start: float
    passed: int = 0
    suppressed: int = 0
    logger: str = ""
    level: int = logging.WARNING


class RepeatLimiter(logging.Filter):
    """Lets `burst` records of each kind pass per `window` seconds (see the module
    doc); `burst` 0 lets everything pass.
    """

    # Kinds remembered at most: bounded, as the templates are the code's own, but a
    # misbehaving library could log ever-new ones.
    MAX_KINDS = 1024

    def __init__(
        self,
        burst: int = 10,
        window: float = 60.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.level = level
        self._clock = clock
        self._kinds: dict[tuple[str, int, str], _Kind] = {}
        self._lock = threading.Lock()  # records come from the loop and from threads

    def filter(self, record: logging.LogRecord) -> bool:
        if self.burst <= 0 or record.levelno < self.level or getattr(record, "summary", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            expired = kind is not None and now - kind.start >= self.window
            if kind is None or expired:
                if len(self._kinds) >= self.MAX_KINDS and kind is None:
                    self._kinds.clear()
                old = kind
                kind = self._kinds[key] = _Kind(now, 0, 0, record.name, record.levelno)
            else:
                old = None
            kind.passed += 1
            passes = kind.passed <= self.burst
            if not passes:
                kind.suppressed += 1
        if old is not None and old.suppressed:
            _summarise(key[2], old, self.window)
        return passes

    def flush(self, expired_only: bool = False) -> None:
        """Writes the summary of every kind whose window ended (all of them, unless
        `expired_only`) and that had records left out; those windows start anew.
        """
        now = self._clock()
        due: list[tuple[str, _Kind]] = []
        with self._lock:
            for key, kind in list(self._kinds.items()):
                if expired_only and now - kind.start < self.window:
                    continue
                del self._kinds[key]
                if kind.suppressed:
                    due.append((key[2], kind))
        for template, kind in due:
            _summarise(template, kind, self.window)


def _summarise(template: str, kind: _Kind, window: float) -> None:
    logging.getLogger(kind.logger).log(
        kind.level, SUMMARY, kind.suppressed, template, window, extra={"summary": True}
    )


def install(burst: int, window: float) -> RepeatLimiter:
    """Puts a RepeatLimiter on every handler of the root logger; returns it."""
    limiter = RepeatLimiter(burst, window)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limiter)
    return limiter
