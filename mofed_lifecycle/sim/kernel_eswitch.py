"""The simulated kernel's eswitch: legacy or switchdev, and the VF representors of switchdev.

MOFED exposes the devlink eswitch mode as `/sys/class/net/<pf>/compat/devlink/mode`; writing
`switchdev` creates one representor netdev per VF on the PF's PCI device (phys_port_name
`pf<fn>vf<i>`), with the kernel's name until udev renames it; `legacy` removes them. As on mlx5,
the mode cannot change while VFs are bound to mlx5_core (EBUSY): configure, switch, then bind.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .kernel_modules import KernelError
from .model import Netdev, Pf
from .scenario import derived_mac

if TYPE_CHECKING:
    from .kernel import SimKernel

MODES = ("legacy", "switchdev")


class EswitchMixin:
    def set_eswitch(self: SimKernel, pf: Pf, mode: str) -> None:
        if mode not in MODES:
            raise KernelError(errno.EINVAL, f"eswitch mode {mode!r}: one of {', '.join(MODES)}")
        if mode == pf.eswitch:
            return
        bound = [vf.pci for vf in pf.vfs if vf.driver == "mlx5_core"]
        if bound:
            raise KernelError(errno.EBUSY, f"{pf.pci}: {len(bound)} VFs are bound to mlx5_core; "
                              "unbind them before changing the eswitch mode")
        pf.eswitch = mode
        if mode == "switchdev":
            for vf in pf.vfs:
                self.add_representor(pf, vf.index)
        else:
            self.drop_representors(pf)
        self.note("eswitch.mode", pf=pf.pci, mode=mode)
        self.tree.eswitch(self.st, pf)
        self.dirty = True

    def add_representor(self: SimKernel, pf: Pf, index: int) -> None:
        ifindex = self.st.next_ifindex
        self.st.next_ifindex += 1
        final = pf.rep_final_name(index)
        name = self._kernel_name(1) if self.sc.rename else final
        nd = Netdev(ifindex, name, final, pf.pci, 1, 1500, False,
                    derived_mac(self.sc.seed, pf.pci, f"rep{index}"), not self.sc.rename,
                    port_name=pf.port_name(index))
        self.st.put_netdev(nd)
        pf.reps[str(index)] = ifindex
        self.tree.netdev(nd)
        self.note("representor.appeared", name=name, pf=pf.pci, vf=index)
        if self.sc.rename:
            self.schedule(self.sc.rename_delay_s(pf.pci, 1000 + index),
                          {"kind": "netdev_named", "ifindex": ifindex})
        else:
            self.bus.emit("add", self._devpath(nd), "net", INTERFACE=name, IFINDEX=str(ifindex))

    def drop_representors(self: SimKernel, pf: Pf) -> None:
        for ifindex in list(pf.reps.values()):
            self._remove_netdev(ifindex)
        pf.reps.clear()
