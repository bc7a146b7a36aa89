"""Netdev events of a simulated node for processes without umockdev: streamed by its kernel."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from ..host.udev import NetdevEvent, event_from_properties
from .client import KernelClient


class SimNetdevEvents:
    """The same events pyudev would deliver under umockdev, read from the kernel process."""

    def __init__(self, root: Path) -> None:
        self.client = KernelClient(root)
        self.queue: queue.Queue[NetdevEvent | None] = queue.Queue()
        stream = self.client.subscribe()  # subscribed before we return: no event is missed
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                       name="sim-netdev-events")
        self.thread.start()

    def _pump(self, stream: Iterator[dict[str, str]]) -> None:
        try:
            for props in stream:
                ev = event_from_properties(props)
                if ev is not None:
                    self.queue.put(ev)
        except (OSError, ValueError):
            pass
        self.queue.put(None)  # the stream ended: wake a waiting poll

    def poll(self, timeout: float | None) -> NetdevEvent | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.close()
