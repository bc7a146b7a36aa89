"""Stop signals (SIGTERM, SIGINT) taken without doing anything in the handler but recording them.

A Python signal handler runs in the main thread between two bytecodes — possibly while that thread
holds a lock (structlog's write lock mid log line, an Event's condition): a handler that logs, sets
an Event or notifies systemd can block on that lock forever. This handler only writes the signal
number to a pipe (async-signal-safe, never blocks: the pipe is non-blocking and one pending byte
is enough); a thread reads it and calls `on_signal(signum)` in normal context.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self, on_signal: Callable[[int], None], name: str = "signals") -> None:
        self.on_signal = on_signal
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._previous: dict[int, Any] = {}

    def install(self, signals: Iterable[int] = STOP_SIGNALS) -> StopSignals:
        self._thread.start()
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self.handler)
        return self

    def uninstall(self) -> None:
        """Put the handlers found at `install` back and end the thread (a caller that goes on
        living after the run: `main()` called in-process)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        with contextlib.suppress(OSError):
            os.close(self._w)  # the thread reads end-of-file, closes its end and returns

    def handler(self, signum: int, _frame: FrameType | None = None) -> None:
        with contextlib.suppress(OSError):  # the pipe is full: a stop is pending already
            os.write(self._w, bytes([signum & 0xFF]))

    def _loop(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                os.close(self._r)
                return
            for signum in data:
                self.on_signal(signum)
