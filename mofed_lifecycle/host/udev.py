"""Netdev events from udev (add, move, remove), keyed by PCI address, through pyudev.

Listening on udev's group means an `add` arrives once udev has finished with the device, renaming
included, so its INTERFACE is the final name. On a simulated node the same pyudev code receives the
simulator's events when the process runs under umockdev (`LD_PRELOAD=libumockdev-preload.so`,
`UMOCKDEV_DIR=<root>`); without umockdev, `SimNetdevEvents` takes them from the kernel process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PCI_IN_DEVPATH = re.compile(r"/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])/net/[^/]+$")


@dataclass(frozen=True)
class NetdevEvent:
    action: str  # add | move | remove | change
    name: str  # the netdev name after this event
    old_name: str | None  # the name before a rename
    ifindex: int | None
    pci: str | None  # the PCI function the netdev belongs to (None for virtual devices)


def event_from_properties(props: Mapping[str, str]) -> NetdevEvent | None:
    """A NetdevEvent from udev properties, or None if they are not a net device's."""
    if props.get("SUBSYSTEM") != "net":
        return None
    devpath = props.get("DEVPATH", "")
    name = props.get("INTERFACE") or devpath.rsplit("/", 1)[-1]
    old = props.get("INTERFACE_OLD") or (props.get("DEVPATH_OLD", "").rsplit("/", 1)[-1] or None)
    m = PCI_IN_DEVPATH.search(devpath)
    ifindex = props.get("IFINDEX")
    return NetdevEvent(props.get("ACTION", ""), name, old if old != name else None,
                       int(ifindex) if ifindex and ifindex.isdigit() else None,
                       m.group(1) if m else None)


class NetdevEvents(Protocol):
    def poll(self, timeout: float | None) -> NetdevEvent | None:
        """The next netdev event, or None when `timeout` seconds pass without one."""
        ...

    def close(self) -> None: ...


class QueuedNetdevEvents:
    """A reader thread turns a source of udev property sets into NetdevEvents on a queue at once;
    `poll` takes them. The source is pyudev's monitor on a node, the kernel process's stream on a
    simulated node without umockdev."""

    def __init__(self, source: Iterator[Mapping[str, str]], name: str) -> None:
        self.queue: queue.Queue[NetdevEvent | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(source,), daemon=True, name=name)
        self.thread.start()

    def _pump(self, source: Iterator[Mapping[str, str]]) -> None:
        try:
            for props in source:
                ev = event_from_properties(props)
                if ev is not None:
                    self.queue.put(ev)
        except (OSError, ValueError):
            pass
        self.queue.put(None)  # the source ended: wake a waiting poll

    def poll(self, timeout: float | None) -> NetdevEvent | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class PyudevNetdevEvents(QueuedNetdevEvents):
    """udev's netdev events through pyudev's monitor (started at construction: no event lost).

    The reader thread drains the monitor socket at once, so that a burst (a thousand VFs created
    and renamed while the restore is busy binding) never fills the socket buffer: a full buffer
    makes the kernel drop events (ENOBUFS), and a dropped `add` is a VF waited for in vain.
    """

    RECEIVE_BUFFER = 16 * 1024 * 1024

    def __init__(self) -> None:
        import pyudev

        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        self.monitor.filter_by("net")
        with contextlib.suppress(Exception):  # needs CAP_NET_ADMIN beyond rmem_max; best effort
            self.monitor.set_receive_buffer_size(self.RECEIVE_BUFFER)
        self.monitor.start()
        self.closed = threading.Event()
        super().__init__(self._devices(), "udev-netdev-events")

    def _devices(self) -> Iterator[Mapping[str, str]]:
        while not self.closed.is_set():
            device = self.monitor.poll(timeout=0.2)  # bounded: close() is noticed within 0.2 s
            if device is not None:
                yield dict(device.properties)

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=2)


def umockdev_active_for(root: Path) -> bool:
    """True when this process's libudev is redirected to `root` by umockdev's preload library."""
    redirected = Path(os.environ.get("UMOCKDEV_DIR", "/nonexistent")).resolve()
    return "umockdev" in os.environ.get("LD_PRELOAD", "") and redirected == Path(root).resolve()
