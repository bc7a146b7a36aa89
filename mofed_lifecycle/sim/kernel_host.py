"""The simulated node around the NIC: the default route and the PFs' firmware configuration.

What `sim set route-default` and `sim set fw` change (an operator's `ip route replace default dev
X`, `mstconfig -d PCI set NUM_OF_VFS=N`). A firmware change waits for a cold reboot, which never
happens in the simulator: it shows as Next Boot beside Current, as mstconfig shows it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .kernel_modules import KernelError
from .scenario import NAME_RE
from .scenario_host import FW_MAX_VFS

if TYPE_CHECKING:
    from .kernel import SimKernel


class HostMixin:
    def set_default_route(self: SimKernel, dev: str | None) -> None:
        """Route the default through `dev` (a netdev of the node, or one outside the simulated
        NICs such as the onboard eno1); None removes the default route."""
        if dev is not None and not NAME_RE.match(dev):
            raise KernelError(errno.EINVAL, f"invalid interface name {dev!r}")
        nd = self.st.netdev_by_any_name(dev) if dev else None
        if nd is not None:
            dev = nd.name
        self.st.default_route = dev
        self.tree.route(self.st)
        self.note("route.default", name=dev)
        self.dirty = True

    # ---- addresses and routes (rtnetlink RTM_*ADDR, RTM_*ROUTE): the uplink's ----------------
    def nl_addrs(self: SimKernel, name: str) -> list[str]:
        return list(self._netdev(name).addresses)

    def nl_addr_add(self: SimKernel, name: str, cidr: str) -> None:
        nd = self._netdev(name)
        if cidr in nd.addresses:
            raise KernelError(errno.EEXIST, "File exists")
        nd.addresses.append(cidr)
        self.tree.route(self.st)  # (its prefix route)
        self.note("addr.added", name=nd.name, address=cidr)
        self.dirty = True

    def nl_routes(self: SimKernel, name: str) -> list[dict[str, object]]:
        nd = self._netdev(name)
        return [{"dst": "default", "gateway": None, "priority": None}] \
            if self.st.default_route == nd.name else []

    def nl_route_add(self: SimKernel, name: str, dst: str) -> None:
        nd = self._netdev(name)
        if dst != "default":
            raise KernelError(errno.EOPNOTSUPP, "the simulated node routes the default only")
        if self.st.default_route == nd.name:
            raise KernelError(errno.EEXIST, "File exists")
        self.set_default_route(nd.name)

    def set_fw(self: SimKernel, pci: str, next_boot_num_of_vfs: int) -> None:
        pf = self.st.pfs.get(pci)
        if pf is None:
            raise KernelError(errno.ENODEV, f"no PF {pci} on this node (PFs: "
                              f"{', '.join(sorted(self.st.pfs))})")
        if isinstance(next_boot_num_of_vfs, bool) or not 0 <= next_boot_num_of_vfs <= FW_MAX_VFS:
            raise KernelError(errno.EINVAL, f"NUM_OF_VFS {next_boot_num_of_vfs!r} out of range "
                              f"0..{FW_MAX_VFS}")
        pf.fw["next_boot_num_of_vfs"] = next_boot_num_of_vfs
        self.tree.firmware(self.st)
        self.note("fw.set", pf=pci, next_boot_num_of_vfs=next_boot_num_of_vfs)
        self.dirty = True
