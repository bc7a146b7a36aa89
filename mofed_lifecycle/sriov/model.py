"""What an SR-IOV snapshot holds: per PF and per VF, keyed by PCI address (names resolved at use).

Plain frozen data with JSON round-trips; no I/O. The snapshot is taken just before a reload and
persisted beside the journal (`sriov/snapshot.py`); the restore plan (`sriov/plan.py`) compares it
with what the node has now.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..host.netlink_types import ZERO_GUID, ZERO_MAC, VfSettings


@dataclass(frozen=True)
class VfSnapshot:
    index: int
    pci: str
    settings: VfSettings  # admin settings held by the PF (IFLA_VF_*)
    driver: str | None  # "mlx5_core", "vfio-pci", ... or None (unbound)
    netdev: str | None = None  # its name when visible in the host namespace
    mtu: int | None = None
    up: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VfSnapshot:
        return cls(**{**d, "settings": VfSettings(**d["settings"]),
                      "mtu": d.get("mtu") or None})  # 0: not known, never written


@dataclass(frozen=True)
class RepSnapshot:
    """A VF representor (switchdev): its VF index, name, MTU and admin state."""

    index: int
    name: str
    mtu: int | None
    up: bool | None


@dataclass(frozen=True)
class PfSnapshot:
    pci: str
    netdev: str | None
    link_type: int  # /sys/class/net/X/type: 1 Ethernet, 32 InfiniBand
    mtu: int | None
    up: bool | None
    mac: str | None
    eswitch: str | None  # "legacy" | "switchdev" | None (not reported)
    numvfs: int
    autoprobe: bool
    vfs: tuple[VfSnapshot, ...] = field(default_factory=tuple)
    representors: tuple[RepSnapshot, ...] = field(default_factory=tuple)
    ifindex: int | None = None  # of its netdev: a reload of the driver gives the PF a new one

    @property
    def ib(self) -> bool:
        return self.link_type == 32

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k not in ("vfs", "representors")},
                "vfs": [v.to_json() for v in self.vfs],
                "representors": [asdict(r) for r in self.representors]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PfSnapshot:
        return cls(**{**d, "vfs": tuple(VfSnapshot.from_json(v) for v in d["vfs"]),
                      "eswitch": d.get("eswitch") or None, "mtu": d.get("mtu") or None,
                      "representors": tuple(RepSnapshot(**r)
                                            for r in d.get("representors", []))})


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    pfs: tuple[PfSnapshot, ...]

    @property
    def vf_count(self) -> int:
        return sum(len(p.vfs) for p in self.pfs)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "taken_at": self.taken_at, "pfs": [p.to_json() for p in self.pfs]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Snapshot:
        return cls(taken_at=d["taken_at"], pfs=tuple(PfSnapshot.from_json(p) for p in d["pfs"]))


def assigned_mac(mac: str | None) -> str | None:
    """A MAC worth restoring: None for unset/all-zero (the kernel then picks its own)."""
    return None if not mac or mac == ZERO_MAC else mac.lower()


def assigned_guid(guid: str | None) -> str | None:
    """A GUID worth restoring: None for an all-zero one ("never assigned": leave it alone)."""
    return None if not guid or guid == ZERO_GUID else guid.lower()


def untouched_pfs(snapshot: Snapshot, ifindex_now: dict[str, int | None]) -> list[PfSnapshot]:
    """PFs whose netdev is still the one the snapshot saw (same ifindex): the driver was never
    reloaded under them (the swap failed before openibd unloaded it, or a predecessor was killed
    before), so their VFs were never destroyed and a restore must not write to them."""
    return [p for p in snapshot.pfs
            if p.ifindex is not None and ifindex_now.get(p.pci) == p.ifindex]


def without_vfs(snapshot: Snapshot, done: set[str]) -> Snapshot:
    """The snapshot less the VFs in `done` (PCI addresses a restore already brought back): a
    resumed restore replays settings only onto the VFs that are still missing."""
    if not done:
        return snapshot
    pfs = tuple(replace(p, vfs=tuple(v for v in p.vfs if v.pci not in done)) for p in snapshot.pfs)
    return replace(snapshot, pfs=pfs)


def merge_pending(fresh: Snapshot, kept: Snapshot, done: set[str]) -> tuple[Snapshot, int]:
    """A snapshot for a new reload while a restore from `kept` had not finished: VFs as they are now
    (`fresh`), except those `kept` still owes (not in `done`), which keep their saved state; a PF
    whose VFs are all gone now keeps its saved entry whole. Returns (merged, VFs carried over)."""
    old = {p.pci: p for p in kept.pfs}
    carried = 0
    pfs: list[PfSnapshot] = []
    for p in fresh.pfs:
        k = old.get(p.pci)
        owed = [v for v in k.vfs if v.pci not in done] if k else []
        if k is None or not owed:
            pfs.append(p)
        elif p.numvfs == 0:
            carried += len(owed)
            pfs.append(k)  # the reload to come destroys them all: every saved VF is owed
        else:
            by_index = {v.index: v for v in owed}
            vfs = tuple(by_index.get(v.index, v) for v in p.vfs)
            carried += sum(1 for v in p.vfs if v.index in by_index)
            pfs.append(replace(p, vfs=vfs))
    return replace(fresh, pfs=tuple(pfs)), carried
