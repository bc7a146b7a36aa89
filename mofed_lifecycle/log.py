"""Logging: structlog, one named event per line — JSON off a TTY, readable console lines on one.

Logs go to stderr, so a command's own output on stdout (`sim state` JSON, `config`) stays clean;
in a container both streams reach the same log. Every event carries a timestamp, a level, the
component that logged it and its name (`event`), e.g. `{"event": "state.entered", "state":
"reload", "elapsed_s": 12.31, ...}`. `Transitions` logs state transitions with the seconds spent
in the previous state and since the start.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class _Tee:
    """Writes each log line to two streams (ENTRYPOINT_DEBUG's trace file beside stderr)."""

    def __init__(self, first: TextIO, second: TextIO) -> None:
        self.first, self.second = first, second

    def write(self, text: str) -> None:
        self.first.write(text)
        self.second.write(text)

    def flush(self) -> None:
        self.first.flush()
        self.second.flush()

    def isatty(self) -> bool:
        return self.first.isatty()


def configure_logging(*, json: bool | None = None, level: str = "info",
                      stream: TextIO | None = None, also: TextIO | None = None) -> None:
    """Set up structlog. `json=None`: JSON unless `stream` (default stderr) is a terminal;
    `also`: a second stream that receives every line too."""
    out: Any = stream or sys.stderr
    if also is not None:
        out = _Tee(out, also)
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    """A logger whose events carry `component` (cli, lifecycle, restore, peermem, sim...)."""
    return structlog.get_logger().bind(component=component)


class Transitions:
    """Logs `state.entered` for each state with the time spent in the previous one."""

    def __init__(self, log: Any, clock: Any = time.monotonic) -> None:
        self.log, self.clock = log, clock
        self.start = self.last = clock()
        self.state: str | None = None

    def enter(self, state: str, **fields: Any) -> float:
        """Record entering `state`; returns the seconds since the start."""
        now = self.clock()
        elapsed = round(now - self.start, 3)
        self.log.info("state.entered", state=state, previous=self.state,
                      previous_s=round(now - self.last, 3), elapsed_s=elapsed, **fields)
        self.state, self.last = state, now
        return float(elapsed)
