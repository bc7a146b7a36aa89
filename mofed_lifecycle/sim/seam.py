"""A simulated node's side of every seam of `host.node.Node`, for a root made by `sim init`.

Netlink and sysfs writes go to the node's kernel process; the stand-in tools come first on PATH;
udev events come through the real libudev when umockdev redirects it to the root, else from the
kernel process's event stream. `in_process=True` runs the stand-in tools as calls in this process
(`inprocess.InProcessCommands`): the same node, without a process per command (fast tests).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..host.commands import Commands
from ..host.node import Node, Tools
from ..host.paths import NodePaths
from ..host.udev import NetdevEvents, PyudevNetdevEvents, umockdev_active_for
from .client import PerThreadClient
from .inprocess import InProcessCommands
from .netlink import SimNetlink
from .node import ensure_tools, tool_path
from .sysfs import SimSysfs
from .udev import SimNetdevEvents


def _commands(root: Path, in_process: bool) -> Commands:
    env = {**os.environ, "PATH": tool_path(root)}
    return InProcessCommands(root, env) if in_process else Commands(env)


def sim_tools(root: str | Path, *, in_process: bool = False) -> Tools:
    """A simulated node's read-only view: its stand-in tools first on PATH."""
    paths = NodePaths.at(root)
    ensure_tools(paths.root)
    return Tools(paths, _commands(paths.root, in_process))


def open_sim_node(root: str | Path, *, in_process: bool = False) -> Node:
    paths = NodePaths.at(root)
    ensure_tools(paths.root)
    client = PerThreadClient(paths.root)

    def events() -> NetdevEvents:
        if umockdev_active_for(paths.root):
            return PyudevNetdevEvents()
        return SimNetdevEvents(paths.root)

    return Node(paths, SimNetlink(client), SimSysfs(client), _commands(paths.root, in_process),
                events=events, closers=(client.close,))
