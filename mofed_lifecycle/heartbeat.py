"""The daemon's heartbeat: proof of life for the liveness probe and systemd's watchdog.

While `mofed-lifecycle run` holds the lock, a small thread writes `heartbeat.json` beside the
journal (`MLX_DRIVERS_MOUNT/mofed-lifecycle/`) every `HEARTBEAT_INTERVAL_SEC` (and, under a
systemd unit with `WatchdogSec=`, sends `WATCHDOG=1` every half watchdog interval). It waits on an
Event with a timeout, never a bare sleep, and beats one last time with `running: false` at exit.

A beat records the current state and since when. Every state but the event waits (serve, refused,
failed) has a budget: the longest its step can legitimately take given the configured timeouts
(`lifecycle/budget.py`). A state held past its budget means the step is hung: the beat says
`overdue`, `WATCHDOG=1` stops (systemd restarts the unit) and `mofed-lifecycle probe live` fails
(kubelet restarts the container); the journal makes the next run resume where this one hung.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .host.files import atomic_write_json, read_json
from .log import get_logger
from .notify import Notifier

HEARTBEAT_FILE = "heartbeat.json"


def read_heartbeat(directory: Path) -> dict[str, Any] | None:
    doc = read_json(directory / HEARTBEAT_FILE)
    return doc if isinstance(doc, dict) else None


class Heartbeat:
    """Beats every `interval_s` (or half the watchdog interval, if shorter) on its own thread."""

    def __init__(self, directory: Path, interval_s: float, notifier: Notifier,
                 state: Callable[[], tuple[str | None, float]],
                 budget: Callable[[str | None], float | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.path = directory / HEARTBEAT_FILE
        self.interval_s = interval_s
        self.notifier, self.state, self.budget, self.clock = notifier, state, budget, clock
        self.period = min(interval_s, notifier.watchdog_s or interval_s)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self.log = get_logger("heartbeat")
        self._warned: set[str] = set()

    def start(self) -> None:
        self.beat()
        self.thread.start()

    def halt(self) -> None:
        """Stop beating, writing nothing more."""
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def stop(self) -> None:
        self.halt()
        self.beat(running=False)

    def _loop(self) -> None:
        while not self.done.wait(self.period):
            self.beat()

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(event, **fields)

    def beat(self, *, running: bool = True) -> dict[str, Any]:
        now = self.clock()
        state, since = self.state()
        budget = self.budget(state)
        overdue = running and budget is not None and now - since > budget
        doc = {"pid": os.getpid(), "running": running, "at": round(now, 3), "state": state,
               "state_since": round(since, 3), "state_budget_s": budget,
               "interval_s": self.interval_s, "overdue": overdue}
        try:
            atomic_write_json(self.path, doc)
        except OSError as e:
            self._warn_once("write", "heartbeat.write_failed", path=str(self.path), error=str(e))
        if overdue:
            self._warn_once(f"overdue:{state}:{since}", "heartbeat.overdue", state=state,
                            in_state_s=round(now - since, 1), budget_s=budget,
                            next="the step looks hung: WATCHDOG=1 stops and `probe live` fails, "
                                 "so the daemon is restarted and resumes from the journal")
        elif running:
            self.notifier.watchdog()
        return doc
