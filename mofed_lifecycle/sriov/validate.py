"""Is a snapshot read back from disk fit to drive sysfs and netlink writes? Pure, no I/O.

A snapshot names the files the restore writes (`/sys/bus/pci/devices/<pci>/sriov_numvfs`,
`/sys/bus/pci/drivers/<driver>/bind`...) and the values it sends. One edited, planted or corrupted
on the drivers mount must never steer a write outside sysfs or send a value the kernel would
misread: every name and value is checked against what the kernel itself allows, and the first that
is not is named. A snapshot that fails is damaged (its copy is used, or the restore stops loudly).
"""

from __future__ import annotations

import re
from typing import Any

from ..host.netlink_types import ARPHRD_ETHER, ARPHRD_INFINIBAND
from .model import Snapshot

PCI_RE = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")  # VMD: 10000:
DRIVER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a directory name under /sys/bus/pci/drivers
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
GUID_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}$")
MAX_VFS = 65535  # sriov_totalvfs is a 16-bit field
MAX_MTU = 65536 * 4  # 0: not known (never written)


def valid_ifname(name: object) -> bool:
    """The kernel's dev_valid_name: 1-15 bytes, not "." or "..", no '/', ':' or whitespace."""
    return (isinstance(name, str) and 0 < len(name.encode()) < 16 and name not in (".", "..")
            and not any(c in name for c in "/:") and not any(c.isspace() for c in name))


def _int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _opt(v: object, check: Any) -> bool:
    return v is None or check(v)


def _bool(v: object) -> bool:
    return v is None or isinstance(v, bool)


def snapshot_problem(snap: Snapshot) -> str | None:
    """The first name or value in `snap` the restore must not use, or None if all are fit."""
    seen: set[str] = set()
    for p in snap.pfs:
        where = f"PF {p.pci!r}"
        checks: list[tuple[bool, str]] = [
            (isinstance(p.pci, str) and bool(PCI_RE.match(p.pci)), "PCI address"),
            (p.pci not in seen, "PCI address (listed twice)"),
            (_opt(p.netdev, valid_ifname), f"netdev name {p.netdev!r}"),
            (p.link_type in (ARPHRD_ETHER, ARPHRD_INFINIBAND), f"link type {p.link_type!r}"),
            (_opt(p.mtu, lambda v: _int(v, 0, MAX_MTU)), f"MTU {p.mtu!r}"),
            (_bool(p.up) and isinstance(p.autoprobe, bool), "up/autoprobe (not true/false)"),
            (_opt(p.mac, lambda v: isinstance(v, str)), "hardware address (never written)"),
            (p.eswitch in (None, "legacy", "switchdev"), f"eswitch mode {p.eswitch!r}"),
            (_int(p.numvfs, 0, MAX_VFS), f"numvfs {p.numvfs!r}"),
            (_opt(p.ifindex, lambda v: _int(v, 1, 2**31 - 1)), f"ifindex {p.ifindex!r}"),
        ]
        seen.add(p.pci)
        for r in p.representors:
            checks += [(valid_ifname(r.name), f"representor name {r.name!r}"),
                       (_int(r.index, 0, MAX_VFS) and _opt(r.mtu, lambda v: _int(v, 0, MAX_MTU))
                        and _bool(r.up), f"representor {r.name!r}'s index, MTU or state")]
        for ok, what in checks:
            if not ok:
                return f"{where}: bad {what}"
        for v in p.vfs:
            if problem := _vf_problem(v, seen):
                return f"{where} VF {v.index!r}: {problem}"
    return None


def _vf_problem(v: Any, seen: set[str]) -> str | None:
    s = v.settings
    checks = [
        (isinstance(v.pci, str) and bool(PCI_RE.match(v.pci)), f"PCI address {v.pci!r}"),
        (v.pci not in seen, f"PCI address {v.pci!r} (listed twice)"),
        (_int(v.index, 0, MAX_VFS) and s.index == v.index, f"index {v.index!r}"),
        (_opt(v.driver, lambda d: isinstance(d, str) and bool(DRIVER_RE.match(d))
              and d not in (".", "..")),
         f"driver {v.driver!r}"),
        (_opt(v.netdev, valid_ifname), f"netdev name {v.netdev!r}"),
        (_opt(v.mtu, lambda m: _int(m, 0, MAX_MTU)) and _bool(v.up), "MTU or up/down"),
        (_opt(s.mac, lambda m: isinstance(m, str) and bool(MAC_RE.match(m.lower()))),
         f"MAC {s.mac!r}"),
        (_int(s.vlan, 0, 4095) and _int(s.qos, 0, 7), f"VLAN {s.vlan!r} / QoS {s.qos!r}"),
        (_bool(s.spoofchk) and _bool(s.trust), "spoofchk/trust (not true/false)"),
        (s.link_state in (None, "auto", "enable", "disable"), f"link state {s.link_state!r}"),
        (_int(s.min_tx_rate, 0, 2**32 - 1) and _int(s.max_tx_rate, 0, 2**32 - 1), "tx rates"),
        (_opt(s.node_guid, lambda g: isinstance(g, str) and bool(GUID_RE.match(g.lower())))
         and _opt(s.port_guid, lambda g: isinstance(g, str) and bool(GUID_RE.match(g.lower()))),
         f"GUIDs {s.node_guid!r}/{s.port_guid!r}"),
    ]
    if isinstance(v.pci, str):
        seen.add(v.pci)
    for ok, what in checks:
        if not ok:
            return f"bad {what}"
    return None
