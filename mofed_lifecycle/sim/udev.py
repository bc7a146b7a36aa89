"""Netdev events of a simulated node for processes without umockdev: streamed by its kernel."""

from __future__ import annotations

from pathlib import Path

from ..host.udev import QueuedNetdevEvents
from .client import KernelClient


class SimNetdevEvents(QueuedNetdevEvents):
    """The same events pyudev would deliver under umockdev, read from the kernel process."""

    def __init__(self, root: Path) -> None:
        self.client = KernelClient(root)
        # subscribed before we return: no event is missed
        super().__init__(self.client.subscribe(), "sim-netdev-events")

    def close(self) -> None:
        self.client.close()
