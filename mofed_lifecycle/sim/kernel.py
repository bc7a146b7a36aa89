"""The simulated kernel's behaviour in time: SR-IOV, binding, netdevs and udev naming.

Semantics follow mlx5 in legacy SR-IOV mode (`shared/scenario-format.md`, "Kernel behaviour"):
writing `sriov_numvfs` creates VFs (EBUSY when changing between two non-zero counts), a bound VF's
netdev appears after the scenario's delay with its kernel name and udev renames it later, admin MAC
and GUIDs reach a VF's netdev only when its driver binds. Module loading and `openibd` live in
`kernel_modules.py`; this class owns the clock, the event queue and the devices.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..host.netlink_types import ZERO_MAC
from .kernel_eswitch import EswitchMixin
from .kernel_host import HostMixin
from .kernel_modules import KernelError, ModulesMixin
from .kernel_netlink import NetlinkMixin
from .model import ADMIN_DEFAULTS, KernelState, Netdev, Pf, Vf, ipoib_address
from .scenario import Scenario, derived_guid, derived_mac, vf_pci
from .tree import PCI_PARENT, Tree
from .uevent import UeventBus

__all__ = ["KernelError", "SimKernel"]


class SimKernel(ModulesMixin, NetlinkMixin, EswitchMixin, HostMixin):
    """One node's kernel: mutate only through these methods, then `advance()` the clock."""

    def __init__(self, root: Path, sc: Scenario, st: KernelState, *,
                 now: Callable[[], float] = time.time) -> None:
        self.root, self.sc, self.st, self.now = root, sc, st, now
        self.tree = Tree(root, sc)
        self.bus = UeventBus(root, self._next_seqnum)
        self.timeline = (root / ".sim" / "timeline.jsonl").open("a", buffering=1)
        self.dirty = False
        self.event_time: float | None = None  # due time of the event being applied, if any
        # when the request being served may be answered: a bind (or an autoprobing numvfs) write
        # returns only once its probes have ended (synchronous probes, contract version 2)
        self.reply_at: float | None = None

    def _next_seqnum(self) -> int:
        self.st.uevent_seqnum += 1
        return self.st.uevent_seqnum

    # ---- time ------------------------------------------------------------------------------
    def schedule(self, delay_s: float, event: dict[str, Any]) -> None:
        """Run `event` after `delay_s` scaled seconds (persisted: it survives a restart)."""
        # An event caused by another one counts from that one's due time, not from when this
        # process got round to it: a loaded machine delays events but never reorders them.
        base = self.event_time if self.event_time is not None else self.now()
        self.schedule_at(base + self.sc.scaled(delay_s), event)

    def schedule_at(self, due: float, event: dict[str, Any]) -> None:
        """Run `event` at wall time `due` (persisted)."""
        self.st.seq += 1
        heapq.heappush(self.st.pending, [due, self.st.seq, event])
        self.dirty = True

    def probe(self, probe_s: float, after: float | None = None) -> float:
        """Reserve a probe lane for a driver probe of `probe_s` (unscaled) seconds: it starts when
        one of the [udev] probe_parallel lanes is free (and not before `after`); returns when it
        ends. The request that caused it is answered then (`reply_at`)."""
        lanes, n = self.st.probe_lanes, self.sc.probe_parallel
        if len(lanes) != n:
            lanes[:] = (lanes + [0.0] * n)[:n]
        base = self.event_time if self.event_time is not None else self.now()
        i = min(range(n), key=lanes.__getitem__)
        end = max(base, lanes[i], after or 0.0) + self.sc.scaled(probe_s)
        lanes[i] = end
        self.reply_at = max(self.reply_at or 0.0, end)
        return end

    def next_due(self) -> float | None:
        return self.st.pending[0][0] if self.st.pending else None

    def advance(self) -> None:
        """Apply every pending event that is due, in time order (catches up after a restart)."""
        while self.st.pending and self.st.pending[0][0] <= self.now():
            due, _seq, ev = heapq.heappop(self.st.pending)
            self.event_time = due
            try:
                getattr(self, "_ev_" + ev["kind"])(**{k: v for k, v in ev.items() if k != "kind"})
            finally:
                self.event_time = None
            self.dirty = True

    def note(self, what: str, **fields: Any) -> None:
        """One line of the kernel's own timeline (what happened, when)."""
        t = self.event_time if self.event_time is not None else self.now()  # kernel time
        self.timeline.write(json.dumps({"t": round(t, 6), "event": what, **fields}) + "\n")

    # ---- netdevs ---------------------------------------------------------------------------
    def _kernel_name(self, link_type: int) -> str:
        prefix = "ib" if link_type == 32 else "eth"
        used = {x for n in self.st.netdevs.values() for x in (n.name, *n.altnames)}
        k = 0
        while f"{prefix}{k}" in used:
            k += 1
        return f"{prefix}{k}"

    def _devpath(self, nd: Netdev) -> str:
        return f"/{PCI_PARENT}/{nd.pci}/net/{nd.name}"

    def _remove_netdev(self, ifindex: int | None) -> None:
        nd = self.st.pop_netdev(ifindex)
        if nd is None:
            return
        self.tree.drop_netdev(nd)
        if self.st.default_route == nd.name:  # its addresses and the routes through it go too
            self.st.default_route = None
            self.tree.route(self.st)
            self.note("route.lost", name=nd.name, pci=nd.pci, addresses=nd.addresses)
        elif nd.addresses:
            self.tree.route(self.st)
        if nd.named:
            self.bus.emit("remove", self._devpath(nd), "net", INTERFACE=nd.name,
                          IFINDEX=str(nd.ifindex))
        self.note("netdev.removed", name=nd.name, pci=nd.pci)

    def _ev_netdev_appear(self, pci: str, bind_seq: int) -> None:
        found = self.st.function(pci)
        if not found:
            return
        pf, vf = found
        owner: Pf | Vf = vf or pf
        if owner.bind_seq != bind_seq or owner.netdev is not None:
            return  # unbound (or rebound) since: this event is stale
        if vf is not None and vf.driver != "mlx5_core":
            return
        n = self.st.seq
        if vf is None:
            address = (pf.mac if pf.link == "eth"
                       else ipoib_address(derived_guid(self.sc.seed, pci, "pf", "port")))
            final, mtu, guids = pf.name, pf.default_mtu, (None, None)
        else:
            a = vf.admin
            # An IB VF takes its admin GUIDs at probe; an unassigned (all-zero) one stays zero.
            node, port = a["node_guid"], a["port_guid"]
            if pf.link == "ib":
                address, guids = ipoib_address(port), (node, port)
            else:
                address = (a["mac"] if a["mac"] != ZERO_MAC
                           else derived_mac(self.sc.seed, pci, f"bind{n}"))
                guids = (None, None)
            final, mtu = pf.vf_final_name(vf.index), pf.default_mtu
        ifindex = self.st.next_ifindex
        self.st.next_ifindex += 1
        name = self._kernel_name(pf.link_type) if self.sc.rename else final
        nd = Netdev(ifindex, name, final, pci, pf.link_type, mtu, False, address,
                    not self.sc.rename, *guids)
        self.st.put_netdev(nd)
        owner.netdev = ifindex
        if vf is None:
            nd.port_name = pf.port_name()
        self.tree.netdev(nd)
        if vf is None:
            self.tree.eswitch(self.st, pf)
        self.note("netdev.appeared", name=name, pci=pci)
        if self.sc.rename:
            idx = vf.index if vf else None
            delay = self.sc.rename_delay_s(pci, idx)
            self.schedule(delay, {"kind": "netdev_named", "ifindex": ifindex})
        else:
            self.bus.emit("add", self._devpath(nd), "net", INTERFACE=name, IFINDEX=str(ifindex))

    def _ev_netdev_named(self, ifindex: int) -> None:
        nd = self.st.netdevs.get(ifindex)
        if nd is None or nd.named:
            return
        old, old_path = nd.name, self._devpath(nd)
        if self.st.netdev_by_any_name(nd.final_name) is None:  # else udev's rename fails: EEXIST
            self.st.rename_netdev(nd, nd.final_name)
            self.tree.rename_netdev(nd, old)
        nd.named = True
        self.note("netdev.named", name=nd.name, old=old, pci=nd.pci)
        self.bus.emit("add", self._devpath(nd), "net", INTERFACE=nd.name, IFINDEX=str(ifindex),
                      INTERFACE_OLD=old)
        if nd.name != old:
            self.bus.emit("move", self._devpath(nd), "net", INTERFACE=nd.name,
                          IFINDEX=str(ifindex), DEVPATH_OLD=old_path)

    # ---- PCI functions and drivers ---------------------------------------------------------
    def _bind(self, pf: Pf, vf: Vf | None, driver: str, after: float | None = None
              ) -> float | None:
        """Bind and probe; returns when the probe ends (mlx5_core: its netdev appears then)."""
        owner: Pf | Vf = vf or pf
        if vf is not None:
            if vf.driver is not None:
                raise KernelError(errno.EBUSY, f"{vf.pci} is already bound to {vf.driver}")
            if vf.driver_override and vf.driver_override != driver:
                raise KernelError(errno.ENODEV,
                                  f"{vf.pci}: driver_override is {vf.driver_override}")
            vf.driver = driver
        owner.bind_seq += 1
        self.bus.emit("bind", f"/{PCI_PARENT}/{owner.pci}", "pci", DRIVER=driver)
        self.note("pci.bound", pci=owner.pci, driver=driver)
        end = None
        if driver == "mlx5_core":
            idx = vf.index if vf else None
            probe_s = self.sc.netdev_delay_s(owner.pci, idx)
            end = self.probe(probe_s, after)
            self.note("pci.probe", pci=owner.pci, start=round(end - self.sc.scaled(probe_s), 6),
                      end=round(end, 6))
            self.schedule_at(end, {"kind": "netdev_appear", "pci": owner.pci,
                                   "bind_seq": owner.bind_seq})
        self.tree.binding(self.st, pf, vf)
        return end

    def _unbind(self, pf: Pf, vf: Vf | None) -> None:
        owner: Pf | Vf = vf or pf
        self._remove_netdev(owner.netdev)
        owner.netdev = None
        owner.bind_seq += 1
        driver = "mlx5_core"
        if vf is not None:
            if vf.driver is None:
                raise KernelError(errno.ENODEV, f"{vf.pci} is not bound to a driver")
            driver, vf.driver = vf.driver, None
        self.bus.emit("unbind", f"/{PCI_PARENT}/{owner.pci}", "pci")
        self.note("pci.unbound", pci=owner.pci, driver=driver)
        self.tree.binding(self.st, pf, vf)

    def set_numvfs(self, pf: Pf, n: int) -> None:
        if "mlx5_core" not in self.st.modules:
            raise KernelError(errno.ENOENT, f"{pf.pci} has no driver bound")
        if n > pf.totalvfs:
            raise KernelError(errno.ERANGE, f"{n} VFs requested, {pf.pci} supports {pf.totalvfs}")
        have = len(pf.vfs)
        if n == have:
            return
        if n and have:
            raise KernelError(errno.EBUSY, f"{pf.pci} already has {have} VFs: write 0 first")
        if n == 0:
            self.remove_vfs(pf)
            return
        previous: float | None = None  # autoprobe probes the new VFs one after another
        for i in range(n):
            vf = Vf(index=i, pci=vf_pci(pf.pci, i, pf.vf_offset), driver=None,
                    admin=dict(ADMIN_DEFAULTS))
            pf.vfs.append(vf)
            self.tree.function(self.st, pf, vf)
            self.bus.emit("add", f"/{PCI_PARENT}/{vf.pci}", "pci", PCI_SLOT_NAME=vf.pci)
            if pf.autoprobe:
                previous = self._bind(pf, vf, "mlx5_core", after=previous)
        self.tree.sriov(pf, bound=True)
        self.note("sriov.numvfs", pf=pf.pci, numvfs=n, autoprobe=pf.autoprobe)

    def remove_vfs(self, pf: Pf) -> None:
        self.drop_representors(pf)
        for vf in pf.vfs:
            self._remove_netdev(vf.netdev)
            self.tree.drop_function(vf.pci)
            self.bus.emit("remove", f"/{PCI_PARENT}/{vf.pci}", "pci")
        if pf.vfs:
            self.note("sriov.numvfs", pf=pf.pci, numvfs=0)
        pf.vfs = []
        self.tree.sriov(pf, bound="mlx5_core" in self.st.modules)

    # ---- sysfs attribute writes (the sysfs seam's simulated side) ----------------------------
    def sysfs_write(self, rel: str, value: str) -> None:
        """A write to the attribute `<root>/<rel>`, answered with the kernel's errno."""
        rel = os.path.relpath(os.path.realpath(self.root / rel.lstrip("/")), self.root)
        parts = rel.split("/")
        v = value.strip()
        if parts[:3] == ["sys", "bus", "pci"] and parts[3:4] == ["drivers_probe"]:
            return self._probe(v)
        if parts[:4] == ["sys", "bus", "pci", "drivers"] and len(parts) == 6:
            driver, attr = parts[4], parts[5]
            if driver == "mlx5_core" and driver not in self.st.modules:
                raise KernelError(errno.ENOENT, f"driver {driver} is not loaded")
            found = self.st.function(v)
            if found is None:
                raise KernelError(errno.ENODEV, f"no PCI device {v!r}")
            pf, vf = found
            if vf is None:
                raise KernelError(errno.EOPNOTSUPP, f"{v} is a PF: (un)binding a PF is not "
                                  "simulated (on a real node it destroys every VF)")
            if attr == "bind":
                self._bind(pf, vf, driver)
                return None
            if attr == "unbind":
                if vf.driver != driver:
                    raise KernelError(errno.ENODEV, f"{v} is not bound to {driver}")
                return self._unbind(pf, vf)
        if len(parts) == 9 and parts[6:] == ["compat", "devlink", "mode"]:
            nd = self.st.netdev_by_name(parts[5])
            uplink = self.st.pfs.get(nd.pci) if nd else None
            if uplink is None or nd is None or uplink.netdev != nd.ifindex:
                raise KernelError(errno.EOPNOTSUPP, f"{parts[5]} is not a PF uplink")
            return self.set_eswitch(uplink, v)
        if parts[:2] == ["sys", *PCI_PARENT.split("/")[:1]] and len(parts) == 5:
            found = self.st.function(parts[3])
            if found:
                return self._device_attr(*found, parts[4], v)
        raise KernelError(errno.EACCES, f"{rel} is not a writable attribute in the simulator")

    def _device_attr(self, pf: Pf, vf: Vf | None, attr: str, v: str) -> None:
        if attr == "driver_override" and vf is not None:
            vf.driver_override = "" if v in ("", "(null)") else v
            return self.tree.binding(self.st, pf, vf)
        if vf is None and attr in ("sriov_numvfs", "sriov_drivers_autoprobe"):
            if not v.isdigit():
                raise KernelError(errno.EINVAL, f"{attr}: {v!r} is not a number")
            if attr == "sriov_numvfs":
                return self.set_numvfs(pf, int(v))
            pf.autoprobe = int(v) != 0
            return self.tree.sriov(pf, bound="mlx5_core" in self.st.modules)
        raise KernelError(errno.EACCES, f"{attr} of {vf.pci if vf else pf.pci} is read-only here")

    def _probe(self, pci: str) -> None:
        found = self.st.function(pci)
        if found is None:
            raise KernelError(errno.ENODEV, f"no PCI device {pci!r}")
        pf, vf = found
        if vf is None or vf.driver is not None:
            return
        driver = vf.driver_override or "mlx5_core"
        if driver == "mlx5_core" and "mlx5_core" not in self.st.modules:
            return  # nothing to bind to: the kernel leaves it unbound
        self._bind(pf, vf, driver)
