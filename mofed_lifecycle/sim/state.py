"""Ground truth: what the simulated kernel holds now, in the contract's `sim state` shape.

Never what the daemon believes: this reads the kernel's own state and the node's files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .model import KernelState, Netdev

MARKERS = ("run/mellanox/drivers/.driver-ready", "run/nvidia/validations/.driver-ctr-ready")


def blacklist_files(root: Path) -> list[str]:
    """Files in the node's etc/modprobe.d that blacklist at least one module."""
    out = []
    for f in sorted((root / "etc/modprobe.d").glob("*.conf")):
        try:
            if re.search(r"^\s*blacklist\s+\S", f.read_text(), re.M):
                out.append(str(f.relative_to(root)))
        except OSError:
            continue
    return out


def _netdev_fields(nd: Netdev | None, ib: bool) -> dict[str, Any]:
    if ib:
        return {"netdev_node_guid": nd.node_guid if nd else None,
                "netdev_port_guid": nd.port_guid if nd else None}
    return {"netdev_mac": nd.address if nd else None}


def ground_truth(st: KernelState, root: Path) -> dict[str, Any]:
    """The node's state as the contract's JSON (`sim state`, `state_before`, `state_after`)."""
    pfs: dict[str, Any] = {}
    for pf in st.pfs.values():
        ib = pf.link == "ib"
        pnd = st.netdevs.get(pf.netdev) if pf.netdev is not None else None
        vfs: dict[str, Any] = {}
        for vf in pf.vfs:
            nd = st.netdevs.get(vf.netdev) if vf.netdev is not None else None
            a = vf.admin
            entry: dict[str, Any] = {"pci": vf.pci, "driver": vf.driver,
                                     "netdev": nd.name if nd else None}
            if ib:
                entry.update(node_guid=a["node_guid"], port_guid=a["port_guid"])
            else:
                entry["mac"] = a["mac"]
            entry.update(_netdev_fields(nd, ib))
            entry.update(trust=a["trust"], spoofchk=a["spoofchk"], link_state=a["link_state"],
                         vlan=a["vlan"], qos=a["qos"], min_tx_rate=a["min_tx_rate"],
                         max_tx_rate=a["max_tx_rate"], mtu=nd.mtu if nd else None,
                         up=nd.up if nd else None)
            vfs[str(vf.index)] = entry
        pfs[pf.pci] = {
            "name": pnd.name if pnd else None, "link": pf.link,
            "mtu": pnd.mtu if pnd else None, "up": pnd.up if pnd else None,
            "mac": pnd.address if pnd else None, "eswitch": pf.eswitch,
            "numvfs": len(pf.vfs), "autoprobe": pf.autoprobe, "vfs": vfs,
            "addresses": list(pnd.addresses) if pnd else [], "fw": dict(pf.fw),
            "representors": {i: {"name": r.name, "mtu": r.mtu, "up": r.up}
                             for i, r in ((i, st.netdevs[x]) for i, x in sorted(
                                 pf.reps.items(), key=lambda kv: int(kv[0])))},
        }
    return {
        "kernel": st.kernel,
        "driver": {"loaded_version": st.loaded_version or None},
        "modules": {m: {"srcversion": st.modules[m].srcversion or None, "refcnt": st.refcnt(m),
                        "holders": st.holders(m)} for m in sorted(st.modules)},
        "blacklist_files": blacklist_files(root),
        "markers": {m: (root / m).exists() for m in MARKERS},
        "pfs": pfs,
        "default_route": st.default_route,
        "altnames": {nd.name: list(nd.altnames) for nd in sorted(
            st.netdevs.values(), key=lambda n: n.name) if nd.altnames},
        "pending_events": len(st.pending),
    }
