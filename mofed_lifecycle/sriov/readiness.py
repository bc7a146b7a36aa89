"""Which functions have a netdev udev has finished with, learnt from udev events by PCI address.

A function is ready when its netdev exists, udev has finished naming it (udev's `add`, or the
`move` of its rename, arrives after the rules ran) and it is bound to the expected driver. Names
are never carried over: the name is the one the last event gave, re-read at the moment of use.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..host.udev import NetdevEvent, NetdevEvents


@dataclass
class Expected:
    pci: str
    name: str | None  # the final name, if known: a netdev already carrying it needs no event
    ready: bool = False
    netdev: str | None = None


class Readiness:
    """Expectations keyed by PCI, fed by a netdev event stream opened *before* the actions.

    `expect` may be called from worker threads (one per PF) while `poll` runs on the main thread.
    """

    def __init__(self, events: NetdevEvents, present: Callable[[str], str | None],
                 driver: Callable[[str], str | None], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.events, self.present, self.driver, self.clock = events, present, driver, clock
        self.expected: dict[str, Expected] = {}
        self.expected_driver: dict[str, str] = {}
        self.fresh: list[Expected] = []  # became ready in `expect`: handed out by the next poll
        self.lock = threading.Lock()
        self.watchers: dict[str, list[queue.Queue[NetdevEvent]]] = {}

    def expect(self, pci: str, name: str | None, driver: str, *, check_now: bool = True) -> None:
        """Wait for `pci`'s netdev. `check_now`: a netdev already carrying `name` counts as ready
        (false after an action that will replace it, e.g. a (re)bind: then only an event counts)."""
        e = Expected(pci, name)
        ready_now = check_now and name is not None and self.present(pci) == name
        with self.lock:
            self.expected[pci] = e
            self.expected_driver[pci] = driver
            if ready_now:
                e.ready, e.netdev = True, name
                self.fresh.append(e)

    def watch(self, pci: str) -> queue.Queue[NetdevEvent]:
        """Every later event of `pci`'s netdevs, copied to a queue (representors of a PF)."""
        q: queue.Queue[NetdevEvent] = queue.Queue()
        with self.lock:
            self.watchers.setdefault(pci, []).append(q)
        return q

    def undelivered(self) -> bool:
        """Ready in `expect` but not yet handed out by `poll`."""
        with self.lock:
            return bool(self.fresh)

    def pending(self) -> list[str]:
        with self.lock:
            return sorted(p for p, e in self.expected.items() if not e.ready)

    def poll(self, timeout: float) -> list[Expected]:
        """Process events for up to `timeout` s; return the expectations that became ready."""
        with self.lock:
            out, self.fresh = self.fresh, []
        if out:
            timeout = 0.0
        end = self.clock() + max(0.0, timeout)
        wait = max(0.0, timeout)
        while True:
            ev = self.events.poll(wait)
            if ev is not None:
                with self.lock:
                    for q in self.watchers.get(ev.pci or "", ()):
                        q.put(ev)
                    e = self.expected.get(ev.pci) if ev.pci else None
                    # an event for another netdev falls through to the deadline check below
                    if e is not None and ev.pci is not None and ev.action == "remove":
                        e.ready, e.netdev = False, None
                        out = [x for x in out if x.pci != ev.pci]
                    elif e is not None and ev.pci is not None and ev.action in ("add", "move") \
                            and not e.ready \
                            and self.driver(ev.pci) == self.expected_driver[ev.pci]:
                        e.ready, e.netdev = True, ev.name
                        out.append(e)
            left = end - self.clock()
            if ev is None or left <= 0:
                return out
            wait = 0.0 if out else left  # drain what is queued, then hand back what is ready


def progress_line(ready: int, total: int, pending: Iterable[str]) -> str:
    waiting = list(pending)
    head = ", ".join(waiting[:3]) + (f" and {len(waiting) - 3} more" if len(waiting) > 3 else "")
    return f"{ready}/{total} VFs ready" + (f", waiting for {head}" if waiting else "")
