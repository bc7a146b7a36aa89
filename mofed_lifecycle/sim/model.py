"""The simulated kernel's state: modules, PCI functions, VFs and netdevs, as plain data.

It is persisted as JSON in `<root>/.sim/kernel.json`; `initial_state` builds it from a scenario
(the node as it is before the daemon starts: the loaded driver, every VF configured and named).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..host.netlink_types import ZERO_GUID, ZERO_MAC
from .scenario import INBOX, PfSpec, Scenario, deps_for, derived_guid, stack_modules

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
    final_name: str  # the name udev gives it
    pci: str  # the PCI function it belongs to
    link_type: int
    mtu: int
    up: bool
    address: str
    named: bool  # udev has finished with it (renamed, add event broadcast)
    node_guid: str | None = None
    port_guid: str | None = None


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

    def vf_final_name(self, index: int) -> str:
        return self.vf_name.format(vf=index, pf=self.name)


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

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
        return next((n for n in self.netdevs.values() if n.name == name), None)

    def function(self, pci: str) -> tuple[Pf, Vf | None] | None:
        """The PF, or (PF, VF), that owns PCI function `pci`."""
        if pci in self.pfs:
            return self.pfs[pci], None
        for pf in self.pfs.values():
            for vf in pf.vfs:
                if vf.pci == pci:
                    return pf, vf
        return None

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
        pf = Pf(pci=spec.pci, name=spec.name, link=spec.link, link_type=spec.link_type,
                mac=spec.mac, totalvfs=spec.totalvfs, vf_name=spec.vf_name, eswitch=spec.eswitch,
                default_mtu=2044 if spec.link == "ib" else 1500, vf_offset=spec.vf_offset)
        st.pfs[spec.pci] = pf
        address = (spec.mac if spec.link == "eth"  # an IPoIB PF: 20-byte address, as on reload
                   else ipoib_address(derived_guid(sc.seed, spec.pci, "pf", "port")))
        pf.netdev = _add_netdev(st, spec.name, spec.pci, spec.link_type, spec.mtu, spec.up,
                                address)
        for v in spec.vfs:
            driver = None if v.driver == "none" else v.driver
            vf = Vf(index=v.index, pci=v.pci, driver=driver, admin=_vf_admin(spec, v))
            pf.vfs.append(vf)
            if driver == "mlx5_core":
                nd = _add_netdev(st, pf.vf_final_name(v.index), v.pci, spec.link_type, v.mtu, v.up,
                                 v.mac or ipoib_address(v.port_guid or ZERO_GUID))
                st.netdevs[nd].node_guid, st.netdevs[nd].port_guid = v.node_guid, v.port_guid
                vf.netdev = nd
    return st


def _add_netdev(st: KernelState, name: str, pci: str, link_type: int, mtu: int, up: bool,
                address: str) -> int:
    ifindex = st.next_ifindex
    st.next_ifindex += 1
    st.netdevs[ifindex] = Netdev(ifindex, name, name, pci, link_type, mtu, up, address, True)
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
