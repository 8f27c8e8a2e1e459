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

`setup` is the server's one logging set-up: one handler (the root's, in the
server's format, behind the limiter) writes every line, TensorFlow's included.
TensorFlow's Python logger gets a handler of its own when it is first used before
the root has one (its lines then printed twice: once in its format, once in ours);
`setup` takes it away, so they reach the root's handler only. Its native start-up
lines ("oneDNN custom operations are on", printed once by each of the two shared
libraries it loads, each after a line about absl's initialisation) are captured
while `import_tensorflow` imports it, and `setup` writes each distinct one once,
through the `tensorflow` logger.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
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


# A native TensorFlow (absl) log line: "I0000 00:00:1796410725.579148   17356
# port.cc:153] message"; its level letter, source location and message.
NATIVE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (\S+:\d+)\] ?(.*)$")
# absl's notice that it writes to stderr before its initialisation: true only of the
# captured import, and printed once per shared library.
ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"
NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}

# TensorFlow's native start-up lines, captured by import_tensorflow: (level, text).
_native: list[tuple[int, str]] = []


def import_tensorflow() -> None:
    """Imports TensorFlow with what it writes to stderr meanwhile (its native start-up
    lines) captured, for `setup` to write once each in the server's format. If the
    import fails, what it wrote goes to stderr as it was, then the error is raised.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to capture: nothing of its lines can be seen anyway
        import tensorflow

        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace")
    _native.extend(parse_native(text))


def parse_native(text: str) -> list[tuple[int, str]]:
    """Distinct native log lines as (level, "port.cc:153] message"), in order; a line
    that is not one continues the one before it (or stands alone, as a warning).
    """
    records: list[tuple[int, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(ABSL_NOTICE):
            continue
        found = NATIVE_LINE.match(line)
        if found:
            level, where, message = found.groups()
            records.append((NATIVE_LEVELS[level], f"{where}] {message}"))
        elif records:
            level, message = records[-1]
            records[-1] = (level, f"{message}\n{line}")
        else:
            records.append((logging.WARNING, line))
    return list(dict.fromkeys(records))


def setup(level: str, burst: int, window: float) -> RepeatLimiter:
    """The server's logging: the root's handler in the server's format, behind a
    RepeatLimiter (returned); TensorFlow's lines through it only, each once.
    """
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tf_logger = logging.getLogger("tensorflow")
    for handler in list(tf_logger.handlers):
        tf_logger.removeHandler(handler)
    tf_logger.propagate = True
    for record_level, message in _native:
        tf_logger.log(record_level, "%s", message)
    _native.clear()
    return install(burst, window)
