"""Wires the node's seams in one place: paths, netlink, sysfs writes, udev events, tool PATH.

A root made by `mofed-lifecycle sim init` gets the simulated kernel's side of each seam; any other
root (`/` on a real node) gets the real one. The daemon's logic only ever sees a `Node`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .netlink_types import Netlink
from .paths import NodePaths
from .sysfs import KernelSysfs, SysfsWriter
from .udev import NetdevEvents, PyudevNetdevEvents, umockdev_active_for


@dataclass
class Node:
    paths: NodePaths
    netlink: Netlink
    sysfs: SysfsWriter
    simulated: bool
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def netdev_events(self) -> NetdevEvents:
        """Start listening for netdev events now (call before the action that causes them)."""
        if self.simulated and not umockdev_active_for(self.paths.root):
            from ..sim.udev import SimNetdevEvents

            return SimNetdevEvents(self.paths.root)
        return PyudevNetdevEvents()

    def close(self) -> None:
        self.netlink.close()
        closer = getattr(self.sysfs, "client", None)  # a simulated node's kernel connections
        if closer is not None:
            closer.close()


def open_node(root: str | Path) -> Node:
    paths = NodePaths.at(root)
    from ..sim.client import is_simulated

    if is_simulated(paths.root):
        from ..sim.client import PerThreadClient
        from ..sim.netlink import SimNetlink
        from ..sim.node import tool_path
        from ..sim.sysfs import SimSysfs

        client = PerThreadClient(paths.root)
        env = {**os.environ, "PATH": tool_path(paths.root)}
        return Node(paths, SimNetlink(client), SimSysfs(client), True, env)
    from .netlink import PyrouteNetlink

    return Node(paths, PyrouteNetlink(), KernelSysfs(), False)
