"""Take the SR-IOV snapshot from the node, and keep it durably beside the journal.

PFs are found by PCI (vendor 0x15b3 with `sriov_totalvfs`), their link type read from
`/sys/class/net/X/type` (not guessed from a name prefix). VFs come from the PF's VF info list over
netlink, so a VF bound to vfio-pci or moved into a pod's namespace is kept; its PCI address, driver
and netdev come from the PF's `virtfnN` link.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ..host.files import atomic_write_json, read_record_with_copy
from ..host.netlink_types import Netlink, NetlinkError, VfSettings
from ..host.paths import NodePaths
from .model import PfSnapshot, RepSnapshot, Snapshot, VfSnapshot
from .validate import snapshot_problem

MELLANOX = "0x15b3"
REP_PORT = re.compile(r"^pf\d+vf(\d+)$")  # a VF representor's phys_port_name
SNAPSHOT_FILE = "sriov-snapshot.json"
SNAPSHOT_COPY = "sriov-snapshot.copy.json"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _int(path: Path, default: int = 0) -> int:
    text = _read(path)
    return int(text) if text and text.lstrip("-").isdigit() else default


class UnreadableAttribute(OSError):
    """A sysfs attribute the snapshot needs holds something that is not a value: the step stops
    before anything is touched, naming the file and what it holds (never a silent default)."""


def _attr(path: Path, allowed: range | tuple[int, ...], absent: int) -> int:
    """An integer attribute that must be one of `allowed`; `absent` if the file is not there."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return absent
    except OSError as e:
        raise UnreadableAttribute(f"{path}: cannot be read ({e.strerror})") from None
    text = raw.decode("ascii", errors="replace").strip()
    if text.lstrip("-").isdigit() and text.isascii() and int(text) in allowed:
        return int(text)
    shown = text[:40] + ("..." if len(text) > 40 else "")
    expected = (f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range)
                else " or ".join(map(str, allowed)))
    raise UnreadableAttribute(f"{path} holds {shown!r}, not a value the snapshot can use "
                              f"(expected {expected}); nothing was changed: check the device "
                              "(dmesg, lspci -vv) before the reload")


def mellanox_pfs(paths: NodePaths) -> list[str]:
    """PCI addresses of the node's Mellanox/NVIDIA functions that can have VFs, sorted."""
    base = paths.sys / "bus" / "pci" / "devices"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [n for n in names if _read(base / n / "vendor") == MELLANOX
            and (base / n / "sriov_totalvfs").exists() and not (base / n / "physfn").exists()]


def _netdevs(paths: NodePaths, pci: str) -> list[str]:
    try:
        return sorted(os.listdir(paths.pci_device(pci) / "net"))
    except OSError:
        return []


def representor_index(paths: NodePaths, pci: str, name: str) -> int | None:
    """The VF index of representor `name` (phys_port_name `pf<fn>vf<i>`), None if not one."""
    m = REP_PORT.match(_read(paths.pci_device(pci) / "net" / name / "phys_port_name") or "")
    return int(m.group(1)) if m else None


def netdev_of(paths: NodePaths, pci: str) -> str | None:
    """The netdev of PCI function `pci` right now (its uplink for a PF in switchdev mode, not a
    representor); None if it has none in this namespace."""
    names = [n for n in _netdevs(paths, pci) if representor_index(paths, pci, n) is None]
    return names[0] if names else None


def representors(paths: NodePaths, pci: str) -> dict[int, str]:
    """VF index -> representor netdev name, for PF `pci` (switchdev)."""
    out = {}
    for name in _netdevs(paths, pci):
        index = representor_index(paths, pci, name)
        if index is not None:
            out[index] = name
    return out


def driver_of(paths: NodePaths, pci: str) -> str | None:
    try:
        return os.path.basename(os.readlink(paths.pci_device(pci) / "driver"))
    except OSError:
        return None


def vf_pci(paths: NodePaths, pf: str, index: int) -> str | None:
    try:
        return os.path.basename(os.readlink(paths.pci_device(pf) / f"virtfn{index}"))
    except OSError:
        return None


def eswitch_mode(paths: NodePaths, netdev: str | None) -> str | None:
    """MOFED's compat sysfs view of the devlink eswitch mode, when present."""
    return (_read(paths.net(netdev) / "compat" / "devlink" / "mode") or None) if netdev else None


def take_snapshot(paths: NodePaths, netlink: Netlink) -> Snapshot:
    pfs = []
    for pci in mellanox_pfs(paths):
        dev = paths.pci_device(pci)
        netdev = netdev_of(paths, pci)
        link = netlink.link(netdev) if netdev else None
        totalvfs = _attr(dev / "sriov_totalvfs", range(0, 65536), 0)
        numvfs = _attr(dev / "sriov_numvfs", range(0, totalvfs + 1), 0)
        settings: list[VfSettings] = []
        if netdev and numvfs:
            try:
                settings = netlink.vfs(netdev)
            except NetlinkError:
                settings = []
        by_index = {s.index: s for s in settings}
        vfs = []
        for i in range(numvfs):
            vpci = vf_pci(paths, pci, i)
            if vpci is None:
                continue
            vnet = netdev_of(paths, vpci)
            vlink = netlink.link(vnet) if vnet else None
            vfs.append(VfSnapshot(index=i, pci=vpci, settings=by_index.get(i, VfSettings(index=i)),
                                  driver=driver_of(paths, vpci), netdev=vnet,
                                  mtu=vlink.mtu or None if vlink else None,
                                  up=vlink.up if vlink else None))
        reps = []
        for index, name in sorted(representors(paths, pci).items()):
            rlink = netlink.link(name)
            reps.append(RepSnapshot(index, name, rlink.mtu or None if rlink else None,
                                    rlink.up if rlink else None))
        pfs.append(PfSnapshot(
            pci=pci, netdev=netdev,
            link_type=_attr(paths.net(netdev) / "type", (1, 32), 1) if netdev else 1,
            mtu=link.mtu or None if link else None, up=link.up if link else None,
            mac=link.address or None if link else None, eswitch=eswitch_mode(paths, netdev),
            numvfs=numvfs, autoprobe=_attr(dev / "sriov_drivers_autoprobe", (0, 1), 1) != 0,
            vfs=tuple(vfs), representors=tuple(reps), ifindex=link.ifindex if link else None))
    return Snapshot(taken_at=time.time(), pfs=tuple(pfs))


def pf_ifindexes(paths: NodePaths, pcis: list[str]) -> dict[str, int | None]:
    """PCI address -> the ifindex of the PF's netdev now (None: no netdev)."""
    out: dict[str, int | None] = {}
    for pci in pcis:
        netdev = netdev_of(paths, pci)
        out[pci] = _int(paths.net(netdev) / "ifindex", -1) if netdev else None
    return out


def save_snapshot(directory: Path, snapshot: Snapshot) -> Path:
    """The snapshot, then an identical copy: one damaged file never loses the VFs."""
    path = directory / SNAPSHOT_FILE
    doc = snapshot.to_json()
    atomic_write_json(path, doc)
    atomic_write_json(directory / SNAPSHOT_COPY, doc)
    return path


def _parses(doc: object) -> bool | str:
    """True if `doc` is a snapshot fit to drive the restore's writes; else why not."""
    try:
        snap = Snapshot.from_json(doc)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return snapshot_problem(snap) or True


def load_snapshot(directory: Path) -> tuple[Snapshot | None, str | None, Path | None]:
    """(snapshot, what was damaged, the file used): the snapshot, or its copy if it is damaged;
    (None, None, None) if there is none; (None, why, None) if both are damaged."""
    doc, damaged, used = read_record_with_copy(directory / SNAPSHOT_FILE,
                                               directory / SNAPSHOT_COPY, _parses)
    return (Snapshot.from_json(doc) if doc is not None else None), damaged, used
