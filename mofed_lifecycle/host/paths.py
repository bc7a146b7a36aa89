"""Root-prefixed paths: every file the daemon touches on the node resolves under `--root`.

On a real node the root is `/`; on a simulated node it is the directory `sim init` built. Logic
never spells `/sys` or `/run` itself: it asks `NodePaths` for the node path it means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class PathOutsideRoot(ValueError):
    """A node path that is relative or climbs out of the root with `..`."""


@dataclass(frozen=True)
class NodePaths:
    """Maps absolute node paths (`/sys/...`) to files under the root directory."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> NodePaths:
        return cls(Path(root).resolve())

    def resolve(self, node_path: str | PurePosixPath) -> Path:
        """The local file for an absolute node path, e.g. `/run/mellanox/drivers/.lock`."""
        p = PurePosixPath(node_path)
        if not p.is_absolute():
            raise PathOutsideRoot(f"node path {str(node_path)!r} is not absolute")
        if ".." in p.parts:
            raise PathOutsideRoot(f"node path {str(node_path)!r} climbs out with '..'")
        rel = p.relative_to("/")
        return self.root / rel if str(rel) != "." else self.root

    def node_path(self, local: Path) -> PurePosixPath:
        """The inverse of `resolve`: the absolute node path of a file under the root."""
        return PurePosixPath("/") / PurePosixPath(local.resolve().relative_to(self.root).as_posix())

    # The trees the daemon reads; each a thin alias for resolve().
    @property
    def sys(self) -> Path:
        return self.resolve("/sys")

    @property
    def proc(self) -> Path:
        return self.resolve("/proc")

    @property
    def run(self) -> Path:
        return self.resolve("/run")

    @property
    def etc(self) -> Path:
        return self.resolve("/etc")

    @property
    def host_etc(self) -> Path:
        """The host's /etc as the driver container sees it (mounted at /host/etc)."""
        return self.resolve("/host/etc")

    def lib_modules(self, kernel: str) -> Path:
        return self.resolve(f"/lib/modules/{kernel}")

    def module(self, name: str) -> Path:
        """`/sys/module/<name>`: present while the module is loaded."""
        return self.sys / "module" / name

    def net(self, ifname: str | None = None) -> Path:
        """`/sys/class/net[/<ifname>]`."""
        base = self.sys / "class" / "net"
        return base / ifname if ifname else base

    def pci_device(self, pci: str) -> Path:
        """`/sys/bus/pci/devices/<pci>`."""
        return self.sys / "bus" / "pci" / "devices" / pci

    def pci_driver(self, driver: str) -> Path:
        """`/sys/bus/pci/drivers/<driver>` (its bind/unbind attributes)."""
        return self.sys / "bus" / "pci" / "drivers" / driver

    @property
    def proc_modules(self) -> Path:
        return self.proc / "modules"

    @property
    def kernel_release(self) -> Path:
        """`/proc/sys/kernel/osrelease`, what `uname -r` prints."""
        return self.proc / "sys" / "kernel" / "osrelease"
