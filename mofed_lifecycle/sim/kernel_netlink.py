"""The simulated kernel's rtnetlink: link facts, link changes and VF settings through the PF.

Answers carry the fields of `host.netlink_types.LinkInfo` / `VfSettings`; refusals carry the errno a
real mlx5 kernel returns (ENODEV, EINVAL, EBUSY for renaming an up link, EOPNOTSUPP for a MAC on an
IB VF...). VF admin settings change only the PF's view: the VF's netdev takes a new MAC or GUID at
its next bind.
"""

from __future__ import annotations

import errno
import re
from typing import TYPE_CHECKING, Any

from ..host.netlink_types import ZERO_GUID, ZERO_MAC
from .kernel_modules import KernelError
from .model import Netdev, Pf

if TYPE_CHECKING:
    from .kernel import SimKernel

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
GUID_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}$")
IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")
LINK_STATES = ("auto", "enable", "disable")
MAX_MTU = {1: 9978, 32: 4092}


def _mac(value: Any, *, allow_zero: bool) -> str:
    mac = str(value).lower()
    if not MAC_RE.match(mac) or (int(mac[:2], 16) & 1) or (mac == ZERO_MAC and not allow_zero):
        raise KernelError(errno.EINVAL, f"invalid unicast MAC address {value!r}")
    return mac


# The order in which the kernel applies the attributes of one IFLA_VF_INFO (do_setvfinfo): MAC,
# VLAN (with QoS), TX rate, rate (min/max), spoofchk, link state, trust, node GUID, port GUID.
VF_APPLY_ORDER: tuple[tuple[str, ...], ...] = (
    ("mac",), ("vlan", "qos"), ("min_tx_rate", "max_tx_rate"), ("spoofchk",), ("link_state",),
    ("trust",), ("node_guid",), ("port_guid",))


def _checked(pf: Pf, pf_name: str, admin: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """One attribute's fields, validated as mlx5 does; raises KernelError for a refused one."""
    ib = pf.link == "ib"
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "mac":
            if ib:
                raise KernelError(errno.EOPNOTSUPP, f"{pf_name} is InfiniBand: VFs have GUIDs")
            out["mac"] = _mac(value, allow_zero=True)
        elif key in ("node_guid", "port_guid"):
            if not ib:
                raise KernelError(errno.EOPNOTSUPP, f"{pf_name} is Ethernet: VFs have no GUIDs")
            guid = str(value).lower()
            if not GUID_RE.match(guid):
                raise KernelError(errno.EINVAL, f"invalid GUID {value!r}")
            if guid == ZERO_GUID:
                raise KernelError(errno.EINVAL, "an all-zero GUID cannot be assigned")
            out[key] = guid
        elif key in ("vlan", "qos", "min_tx_rate", "max_tx_rate"):
            limit = {"vlan": 4095, "qos": 7}.get(key, 10**6)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise KernelError(errno.EINVAL, f"{key} {value!r} out of range 0..{limit}")
            out[key] = value
        elif key in ("trust", "spoofchk"):
            out[key] = bool(value)
        elif value not in LINK_STATES:
            raise KernelError(errno.EINVAL, f"link_state {value!r}: one of {LINK_STATES}")
        else:
            out[key] = value
    if "max_tx_rate" in out or "min_tx_rate" in out:
        lo = out.get("min_tx_rate", admin["min_tx_rate"])
        hi = out.get("max_tx_rate", admin["max_tx_rate"])
        if hi and lo > hi:
            raise KernelError(errno.EINVAL, "min_tx_rate exceeds max_tx_rate")
    return out


class NetlinkMixin:
    """rtnetlink operations of SimKernel."""

    def _netdev(self: SimKernel, name: str) -> Netdev:
        nd = self.st.netdev_by_any_name(name)
        if nd is None:
            raise KernelError(errno.ENODEV, f"Cannot find device \"{name}\"")
        return nd

    def _pf_of(self: SimKernel, name: str) -> Pf:
        nd = self._netdev(name)
        pf = self.st.pfs.get(nd.pci)
        if pf is None or pf.netdev != nd.ifindex:  # a VF, or a representor on the PF's device
            raise KernelError(errno.EOPNOTSUPP, f"{name} is not a PF: it has no VFs to configure")
        return pf

    def link_info(self: SimKernel, nd: Netdev) -> dict[str, Any]:
        pf = self.st.pfs.get(nd.pci)
        return {"ifindex": nd.ifindex, "name": nd.name, "mtu": nd.mtu, "up": nd.up,
                "address": nd.address, "link_type": nd.link_type,
                "num_vf": len(pf.vfs) if pf and pf.netdev == nd.ifindex else 0,
                "altnames": list(nd.altnames)}

    def nl_link(self: SimKernel, name: str) -> dict[str, Any] | None:
        nd = self.st.netdev_by_any_name(name)  # a name or an altname, as the kernel resolves it
        return self.link_info(nd) if nd else None

    def nl_links(self: SimKernel) -> list[dict[str, Any]]:
        netdevs = sorted(self.st.netdevs.values(), key=lambda n: n.ifindex)
        return [self.link_info(nd) for nd in netdevs]

    def nl_vfs(self: SimKernel, pf_name: str) -> list[dict[str, Any]]:
        nd = self._netdev(pf_name)
        pf = self.st.pfs.get(nd.pci)
        if pf is None or pf.netdev != nd.ifindex:
            return []
        ib = pf.link == "ib"
        out = []
        for vf in pf.vfs:
            a = vf.admin
            out.append({
                "index": vf.index, "mac": None if ib else a["mac"], "vlan": a["vlan"],
                "qos": a["qos"], "spoofchk": a["spoofchk"], "trust": a["trust"],
                "link_state": a["link_state"], "min_tx_rate": a["min_tx_rate"],
                "max_tx_rate": a["max_tx_rate"],
                "node_guid": a["node_guid"] if ib else None,
                "port_guid": a["port_guid"] if ib else None,
            })
        return out

    def nl_set_vfs(self: SimKernel, pf_name: str, infos: list[tuple[int, dict[str, Any]]]) -> None:
        """A list of IFLA_VF_INFOs, applied in order: the first refused one stops the rest."""
        for vf, change in infos:
            self.nl_set_vf(pf_name, int(vf), change)

    def nl_set_vf(self: SimKernel, pf_name: str, vf: int, change: dict[str, Any]) -> None:
        """One IFLA_VF_INFO. Fields apply in the kernel's order (VF_APPLY_ORDER); the first refused
        one stops the request and what was applied before it stays (the contract's "Partial
        apply"). A node GUID ends the request: a port GUID beside it is ignored, as on mlx5."""
        pf = self._pf_of(pf_name)
        if not isinstance(vf, int) or not 0 <= vf < len(pf.vfs):
            raise KernelError(errno.EINVAL, f"{pf_name} has no VF {vf} (numvfs = {len(pf.vfs)})")
        unknown = sorted(set(change) - {k for group in VF_APPLY_ORDER for k in group})
        if unknown:
            raise KernelError(errno.EINVAL, f"unknown VF setting {unknown[0]!r}")
        target = pf.vfs[vf]
        was = dict(target.admin)
        try:
            for group in VF_APPLY_ORDER:
                fields = {k: change[k] for k in group if change.get(k) is not None}
                if fields:
                    target.admin.update(_checked(pf, pf_name, target.admin, fields))
                    if "node_guid" in fields:
                        break  # the kernel sets the node GUID and returns
        finally:
            changed = {k: v for k, v in target.admin.items() if was.get(k) != v}
            if changed:
                self.note("vf.set", pf=pf.pci, vf=vf, pci=target.pci, changed=changed)
                self.dirty = True

    def nl_set_link(self: SimKernel, name: str, change: dict[str, Any]) -> None:
        nd = self._netdev(name)
        mtu, up, address, new_name = (change.get(k) for k in ("mtu", "up", "address", "name"))
        if mtu is not None and not (isinstance(mtu, int) and 68 <= mtu <= MAX_MTU[nd.link_type]):
            raise KernelError(errno.EINVAL, f"mtu {mtu!r} out of range 68..{MAX_MTU[nd.link_type]} "
                              f"for {name}")
        if address is not None:
            if nd.link_type != 1:
                raise KernelError(errno.EOPNOTSUPP, f"{name}: cannot set an IPoIB address")
            address = _mac(address, allow_zero=False)
        if new_name is not None and new_name != nd.name:
            if not IFNAME_RE.match(str(new_name)):
                raise KernelError(errno.EINVAL, f"invalid interface name {new_name!r}")
            holder = self.st.netdev_by_any_name(new_name)
            if holder is not None:  # a name or an altname of any netdev, this one too
                raise KernelError(errno.EEXIST, f"{new_name} is taken: "
                                  + ("a netdev has that name" if holder.name == new_name else
                                     f"an alternative name of {holder.name}"))
            if nd.up and up is not False:
                raise KernelError(errno.EBUSY, f"{name} is up: bring it down to rename it")
        was = {"mtu": nd.mtu, "up": nd.up, "address": nd.address, "name": nd.name}
        if up is False:
            nd.up = False
        if mtu is not None:
            nd.mtu = mtu
        if address is not None:
            nd.address = address
        if new_name is not None and new_name != nd.name:
            old = nd.name
            self.st.rename_netdev(nd, new_name)
            if self.st.default_route == old:
                self.st.default_route = new_name
                self.tree.route(self.st)
            if nd.named and old == nd.final_name:  # renamed away from the name udev gave it:
                nd.altnames.append(old)  # udev's altname policy keeps that name as an altname
            elif not nd.named:
                nd.final_name = new_name  # named before udev got to it: udev leaves it so
            self.tree.rename_netdev(nd, old)
            self.bus.emit("move", f"/{self.tree.dev_dir(nd.pci).relative_to(self.tree.sys)}/net/"
                          f"{new_name}", "net", INTERFACE=new_name, IFINDEX=str(nd.ifindex),
                          DEVPATH_OLD=f"/{self.tree.dev_dir(nd.pci).relative_to(self.tree.sys)}"
                          f"/net/{old}")
        if up is True:
            nd.up = True
        now = {"mtu": nd.mtu, "up": nd.up, "address": nd.address, "name": nd.name}
        self.note("link.set", name=nd.name, pci=nd.pci,
                  changed={k: v for k, v in now.items() if was[k] != v})
        self.tree.netdev_state(nd)
        self.dirty = True

    def nl_del_altname(self: SimKernel, name: str, altname: str) -> None:
        """RTM_DELLINKPROP: `ip link property del dev NAME altname ALTNAME`."""
        nd = self._netdev(name)
        if altname not in nd.altnames:
            raise KernelError(errno.ENOENT, f"{nd.name} has no alternative name {altname}")
        nd.altnames.remove(altname)
        self.note("link.altname_deleted", name=nd.name, pci=nd.pci, altname=altname)
        self.dirty = True
