"""The node the daemon's logic sees: paths, netlink, sysfs writes, udev events, its tools.

`open_node` wires a real node (`/` or another root) to the real kernel. A simulated node is wired
by `sim/seam.py` (`open_sim_node`: the kernel process; `open_inprocess_node`: the same kernel,
its tools run in-process, for fast tests); which one a root gets is chosen by the caller (the
CLI's `Seams`), so nothing here knows the simulator. The daemon's logic only ever sees a `Node`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .commands import Commands
from .netlink_types import Netlink
from .paths import NodePaths
from .sysfs import KernelSysfs, SysfsWriter
from .udev import NetdevEvents, PyudevNetdevEvents


@dataclass
class Node:
    paths: NodePaths
    netlink: Netlink
    sysfs: SysfsWriter
    # how its tools run (modinfo, modprobe, openibd, mount): subprocesses on PATH on a real node
    commands: Commands = field(default_factory=lambda: Commands(os.environ))
    # starts listening for netdev events (called before the action that causes them)
    events: Callable[[], NetdevEvents] = PyudevNetdevEvents
    closers: tuple[Callable[[], None], ...] = ()  # connections the seams hold besides netlink

    def netdev_events(self) -> NetdevEvents:
        """Start listening for netdev events now (call before the action that causes them)."""
        return self.events()

    def close(self) -> None:
        self.netlink.close()
        for close in self.closers:
            close()


@dataclass(frozen=True)
class Tools:
    """The read-only view of a node for what only reads it and runs its tools (status, probes,
    the peermem loader): its paths, and how its tools run (`modinfo`, `modprobe`). No netlink,
    no sysfs writer."""

    paths: NodePaths
    commands: Commands


def host_tools(root: str | Path) -> Tools:
    """A real node's tools: the ones on PATH."""
    return Tools(NodePaths.at(root), Commands(os.environ))


def open_node(root: str | Path) -> Node:
    """A node whose seams are the real kernel's (pyroute2, sysfs writes, pyudev)."""
    from .netlink import PyrouteNetlink

    return Node(NodePaths.at(root), PyrouteNetlink(), KernelSysfs())
