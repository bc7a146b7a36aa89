"""The simulated kernel's state: modules, PCI functions, VFs and netdevs, as plain data.

It is persisted as JSON in `<root>/.sim/kernel.json`; `initial_state` builds it from a scenario
(the node as it is before the daemon starts: the loaded driver, every VF configured and named).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..host.netlink_types import ZERO_GUID, ZERO_MAC
from .scenario import (
    INBOX,
    FwSpec,
    PfSpec,
    Scenario,
    deps_for,
    derived_guid,
    derived_mac,
    stack_modules,
)

ADMIN_DEFAULTS: dict[str, Any] = {
    "mac": ZERO_MAC, "vlan": 0, "qos": 0, "trust": False, "spoofchk": True,
    "link_state": "auto", "min_tx_rate": 0, "max_tx_rate": 0,
    "node_guid": ZERO_GUID, "port_guid": ZERO_GUID,
}


@dataclass
class Module:
    name: str
    srcversion: str
    version: str  # the driver version it belongs to ("inbox" for the distribution's)
    uses: list[str]  # modules it depends on: it appears in their holders/
    users: int = 0  # references that are not modules (open devices, peers)


@dataclass
class Netdev:
    ifindex: int
    name: str  # the name now (kernel name until udev renames it)
    final_name: str  # the name udev gives (or gave) it
    pci: str  # the PCI function it belongs to
    link_type: int
    mtu: int
    up: bool
    address: str
    named: bool  # udev has finished with it (renamed, add event broadcast)
    node_guid: str | None = None
    port_guid: str | None = None
    port_name: str | None = None  # phys_port_name: "p0" for a PF, "pf0vf3" for a representor
    altnames: list[str] = field(default_factory=list)  # alternative names (IFLA_ALT_IFNAME)
    addresses: list[str] = field(default_factory=list)  # IP addresses (CIDR): gone with the netdev


@dataclass
class Vf:
    index: int
    pci: str
    driver: str | None  # "mlx5_core", "vfio-pci" or None (unbound)
    admin: dict[str, Any]  # IFLA_VF_* settings held by the PF
    bind_seq: int = 0  # bumped on every bind/unbind: stale delayed events are dropped
    driver_override: str = ""
    netdev: int | None = None  # ifindex


@dataclass
class Pf:
    pci: str
    name: str
    link: str
    link_type: int
    mac: str
    totalvfs: int
    vf_name: str
    autoprobe: bool = True
    eswitch: str = "legacy"
    vfs: list[Vf] = field(default_factory=list)
    bind_seq: int = 0
    netdev: int | None = None
    default_mtu: int = 1500
    vf_offset: int = 2  # sriov_offset (see scenario.vf_offsets)
    rep_name: str = "{pf}_{vf}"
    reps: dict[str, int] = field(default_factory=dict)  # VF index -> representor ifindex
    fw: dict[str, Any] = field(default_factory=dict)  # num_of_vfs, next_boot_num_of_vfs, sriov_en

    def vf_final_name(self, index: int) -> str:
        return self.vf_name.format(vf=index, pf=self.name)

    def rep_final_name(self, index: int) -> str:
        return self.rep_name.format(vf=index, pf=self.name)

    def port_name(self, index: int | None = None) -> str:
        """phys_port_name: "p<fn>" for the PF's uplink, "pf<fn>vf<index>" for a representor."""
        fn = int(self.pci.rsplit(".", 1)[1])
        return f"p{fn}" if index is None else f"pf{fn}vf{index}"


@dataclass
class KernelState:
    kernel: str
    loaded_version: str  # driver version of the stack loaded now ("" while unloaded)
    modules: dict[str, Module]
    pfs: dict[str, Pf]
    netdevs: dict[int, Netdev]
    next_ifindex: int = 2
    pending: list[list[Any]] = field(default_factory=list)  # [due wall time, seq, event dict]
    seq: int = 0
    uevent_seqnum: int = 0
    openibd_restarts: int = 0
    peermem_loads: int = 0
    default_route: str | None = None  # the netdev the default route goes through, if any
    # until when each of the [udev] probe_parallel probe lanes is busy (wall time)
    probe_lanes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name: dict[str, int] = {n.name: i for i, n in self.netdevs.items()}
        self._functions: dict[str, tuple[Pf, Vf | None]] = {}

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON (a walk without `asdict`'s deep copies: 2-3x faster on 1,000 VFs)."""
        doc: dict[str, Any] = _plain(self)
        return doc

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelState:
        pfs = {}
        for pci, p in d["pfs"].items():
            vfs = [Vf(**v) for v in p.pop("vfs")]
            pfs[pci] = Pf(**p, vfs=vfs)
        return cls(
            **{k: v for k, v in d.items() if k not in ("modules", "pfs", "netdevs")},
            modules={k: Module(**m) for k, m in d["modules"].items()},
            pfs=pfs,
            netdevs={int(k): Netdev(**n) for k, n in d["netdevs"].items()},
        )

    # ---- queries used everywhere ----
    def netdev_by_name(self, name: str) -> Netdev | None:
        nd = self.netdevs.get(self._by_name.get(name, -1))
        return nd if nd is not None and nd.name == name else None

    def netdev_by_any_name(self, name: str) -> Netdev | None:
        """The netdev whose name or alternative name is `name`, as the kernel resolves a name."""
        nd = self.netdev_by_name(name)
        if nd is None:
            nd = next((n for n in self.netdevs.values() if name in n.altnames), None)
        return nd

    # Every change of the netdev table goes through these three, which keep the name index.
    def put_netdev(self, nd: Netdev) -> None:
        self.netdevs[nd.ifindex] = nd
        self._by_name[nd.name] = nd.ifindex

    def pop_netdev(self, ifindex: int | None) -> Netdev | None:
        nd = self.netdevs.pop(ifindex, None) if ifindex is not None else None
        if nd is not None and self._by_name.get(nd.name) == ifindex:
            del self._by_name[nd.name]
        return nd

    def rename_netdev(self, nd: Netdev, name: str) -> None:
        if self._by_name.get(nd.name) == nd.ifindex:
            del self._by_name[nd.name]
        nd.name = name
        self._by_name[name] = nd.ifindex

    def function(self, pci: str) -> tuple[Pf, Vf | None] | None:
        """The PF, or (PF, VF), that owns PCI function `pci` (indexed; the index is checked on
        every hit and rebuilt on a miss, so VFs created or removed since never go stale)."""
        hit = self._functions.get(pci)
        if hit is not None:
            pf, vf = hit
            if vf is None or (vf.index < len(pf.vfs) and pf.vfs[vf.index] is vf):
                return hit
        self._functions = {p.pci: (p, None) for p in self.pfs.values()}
        self._functions.update({v.pci: (p, v) for p in self.pfs.values() for v in p.vfs})
        return self._functions.get(pci)

    def holders(self, module: str) -> list[str]:
        return sorted(m.name for m in self.modules.values() if module in m.uses)

    def refcnt(self, module: str) -> int:
        return len(self.holders(module)) + self.modules[module].users


def _vf_admin(pf: PfSpec, v: Any) -> dict[str, Any]:
    admin = dict(ADMIN_DEFAULTS)
    for k in ADMIN_DEFAULTS:
        val = getattr(v, k)
        if val is not None:
            admin[k] = val
    return admin


def initial_state(sc: Scenario) -> KernelState:
    """The node before the daemon starts: the loaded driver up, every VF configured and named."""
    st = KernelState(kernel=sc.kernel, loaded_version=sc.loaded_version, modules={}, pfs={},
                     netdevs={})
    for m in stack_modules(sc.loaded_version) + sc.aux_loaded:
        st.modules[m] = Module(m, sc.host_srcversion(m), sc.loaded_version,
                               list(deps_for(sc.loaded_version, m)))
    for name, holds in sc.extra_modules:
        st.modules[name] = Module(name, sc.host_srcversion(name), sc.loaded_version, list(holds))
    if sc.gpu and sc.gpu.peermem_loaded:
        from .scenario import peer_exporter

        exporter = peer_exporter(sc.loaded_version) or "ib_core"
        uses = sorted({"ib_core", exporter})
        srcversion = sc.host_srcversion("nvidia_peermem")
        st.modules["nvidia_peermem"] = Module("nvidia_peermem", srcversion, "nvidia", uses,
                                              users=sc.gpu.peermem_users)
    for spec in sc.pfs:
        fw = spec.fw or FwSpec(spec.totalvfs, spec.totalvfs)
        pf = Pf(pci=spec.pci, name=spec.name, link=spec.link, link_type=spec.link_type,
                mac=spec.mac, vf_name=spec.vf_name, eswitch=spec.eswitch,
                # sriov_totalvfs is what the firmware allows now (NUM_OF_VFS, SRIOV_EN)
                totalvfs=min(spec.totalvfs, fw.num_of_vfs) if fw.sriov_en else 0,
                default_mtu=2044 if spec.link == "ib" else 1500, vf_offset=spec.vf_offset,
                rep_name=spec.rep_name, fw={"num_of_vfs": fw.num_of_vfs, "next_boot_num_of_vfs":
                                            fw.next_boot_num_of_vfs, "sriov_en": fw.sriov_en})
        st.pfs[spec.pci] = pf
        address = (spec.mac if spec.link == "eth"  # an IPoIB PF: 20-byte address, as on reload
                   else ipoib_address(derived_guid(sc.seed, spec.pci, "pf", "port")))
        pf.netdev = _add_netdev(st, spec.name, spec.pci, spec.link_type, spec.mtu, spec.up,
                                address)
        st.netdevs[pf.netdev].port_name = pf.port_name()
        if spec.eswitch == "switchdev":  # representors, named by udev long ago
            for v in spec.vfs:
                rep = _add_netdev(st, pf.rep_final_name(v.index), spec.pci, 1, 1500, True,
                                  derived_mac(sc.seed, spec.pci, f"rep{v.index}"))
                st.netdevs[rep].port_name = pf.port_name(v.index)
                pf.reps[str(v.index)] = rep
        for v in spec.vfs:
            driver = None if v.driver == "none" else v.driver
            vf = Vf(index=v.index, pci=v.pci, driver=driver, admin=_vf_admin(spec, v))
            pf.vfs.append(vf)
            if driver == "mlx5_core":
                # an all-zero admin MAC: mlx5 gives the netdev a random one at probe
                mac = derived_mac(sc.seed, v.pci, "bind0") if v.mac == ZERO_MAC else v.mac
                nd = _add_netdev(st, pf.vf_final_name(v.index), v.pci, spec.link_type, v.mtu, v.up,
                                 mac or ipoib_address(v.port_guid or ZERO_GUID))
                st.netdevs[nd].node_guid, st.netdevs[nd].port_guid = v.node_guid, v.port_guid
                vf.netdev = nd
    route = sc.host.default_route
    st.default_route = route
    uplink = st.netdev_by_name(route) if route else None
    if uplink is not None:
        uplink.addresses = list(sc.host.uplink_addresses)
    return st


def _add_netdev(st: KernelState, name: str, pci: str, link_type: int, mtu: int, up: bool,
                address: str) -> int:
    ifindex = st.next_ifindex
    st.next_ifindex += 1
    st.put_netdev(Netdev(ifindex, name, name, pci, link_type, mtu, up, address, True))
    return ifindex


def ipoib_address(port_guid: str) -> str:
    """A 20-byte IPoIB hardware address: QPN and flags, subnet prefix, then the port GUID."""
    return "00:00:10:87:fe:80:00:00:00:00:00:00:" + port_guid


def save_state(st: KernelState, path: Path) -> None:
    """Write the state atomically (temp file + rename): a reader never sees half a state."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(st.to_json(), separators=(",", ":")))
    os.replace(tmp, path)


def load_state(path: Path) -> KernelState:
    return KernelState.from_json(json.loads(path.read_text()))


def is_vendor(version: str) -> bool:
    return bool(version) and version != INBOX


def _plain(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
