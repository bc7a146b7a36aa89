"""A simulated node's side of every seam of `host.node.Node`, for a root made by `sim init`.

Netlink and sysfs writes go to the node's kernel process; the stand-in tools come first on PATH;
udev events come through the real libudev when umockdev redirects it to the root, else from the
kernel process's event stream.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..host.node import Node, Tools
from ..host.paths import NodePaths
from ..host.udev import NetdevEvents, PyudevNetdevEvents, umockdev_active_for
from .client import PerThreadClient
from .netlink import SimNetlink
from .node import ensure_tools, tool_path
from .sysfs import SimSysfs
from .udev import SimNetdevEvents


def sim_tools(root: str | Path) -> Tools:
    """A simulated node's read-only view: its stand-in tools first on PATH."""
    paths = NodePaths.at(root)
    ensure_tools(paths.root)
    return Tools(paths, {**os.environ, "PATH": tool_path(paths.root)})


def open_sim_node(root: str | Path) -> Node:
    paths = NodePaths.at(root)
    ensure_tools(paths.root)
    client = PerThreadClient(paths.root)

    def events() -> NetdevEvents:
        if umockdev_active_for(paths.root):
            return PyudevNetdevEvents()
        return SimNetdevEvents(paths.root)

    env = {**os.environ, "PATH": tool_path(paths.root)}
    return Node(paths, SimNetlink(client), SimSysfs(client), env, events=events,
                closers=(client.close,))
