"""Restore decisions, pure: what to change on a VF, whether it must (re)bind, what to do to numvfs.

Every function compares the snapshot with what the node holds now and returns only the difference,
so a restore is idempotent: run it twice (or after a crash half-way) and the second run changes
only what is still wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from ..host.netlink_types import LinkChange, LinkInfo, VfChange, VfSettings
from .model import PfSnapshot, RepSnapshot, VfSnapshot, assigned_guid, assigned_mac

NETDEV_DRIVER = "mlx5_core"  # the driver whose VFs have a netdev in the host namespace


class NumvfsAction(StrEnum):
    CREATE = "create"  # none now: create them (unbound, configure, bind once)
    KEEP = "keep"  # the right count exists: configure what differs
    RECREATE = "recreate"  # another non-zero count: 0 first (EBUSY otherwise), then create
    NONE = "none"  # the snapshot had no VFs on this PF


def numvfs_action(saved: int, current: int) -> NumvfsAction:
    if saved == 0:
        return NumvfsAction.NONE
    if current == saved:
        return NumvfsAction.KEEP
    return NumvfsAction.CREATE if current == 0 else NumvfsAction.RECREATE


def vf_change(saved: VfSettings, current: VfSettings | None, *, ib: bool) -> VfChange:
    """The IFLA_VF_* settings to apply so that the VF matches the snapshot.

    Unset or all-zero MACs and all-zero GUIDs are never written (skipped, not failed); settings the
    driver did not report (None) are left alone."""
    cur = current or VfSettings(index=saved.index)

    def differs(a: object, b: object) -> bool:
        return a is not None and a != b

    mac = assigned_mac(saved.mac) if not ib else None
    node = assigned_guid(saved.node_guid) if ib else None
    port = assigned_guid(saved.port_guid) if ib else None
    return VfChange(
        mac=mac if differs(mac, (cur.mac or "").lower()) else None,
        vlan=saved.vlan if (saved.vlan, saved.qos) != (cur.vlan, cur.qos) else None,
        qos=saved.qos if (saved.vlan, saved.qos) != (cur.vlan, cur.qos) else None,
        spoofchk=saved.spoofchk if differs(saved.spoofchk, cur.spoofchk) else None,
        trust=saved.trust if differs(saved.trust, cur.trust) else None,
        link_state=saved.link_state if differs(saved.link_state, cur.link_state) else None,
        min_tx_rate=(saved.min_tx_rate
                     if (saved.min_tx_rate, saved.max_tx_rate) != (cur.min_tx_rate,
                                                                   cur.max_tx_rate) else None),
        max_tx_rate=(saved.max_tx_rate
                     if (saved.min_tx_rate, saved.max_tx_rate) != (cur.min_tx_rate,
                                                                   cur.max_tx_rate) else None),
        node_guid=node if differs(node, (cur.node_guid or "").lower()) else None,
        port_guid=port if differs(port, (cur.port_guid or "").lower()) else None,
    )


def unkept(saved: VfSettings, current: VfSettings, *, ib: bool) -> dict[str, tuple[object, object]]:
    """Settings the kernel reads back other than saved, {field: (wanted, read)}, after a restore
    (a kernel may accept a request and ignore part of it: a port GUID beside a node GUID, or stop
    at a refused field). A field the driver does not report (None) cannot be checked: left out."""
    change = vf_change(saved, current, ib=ib)
    return {f: (want, got) for f in change.__dataclass_fields__
            if (want := getattr(change, f)) is not None
            and (got := getattr(current, f)) is not None and want != got}


def unverifiable(saved: VfSettings, current: VfSettings, *, ib: bool) -> list[str]:
    """Settings to restore that the driver does not report (None when read back)."""
    change = vf_change(saved, current, ib=ib)
    return [f for f in change.__dataclass_fields__
            if getattr(change, f) is not None and getattr(current, f) is None]


def identity_changes(change: VfChange) -> bool:
    """True if `change` touches what a bound VF reads only when it binds (MAC, GUIDs)."""
    return any(v is not None for v in (change.mac, change.node_guid, change.port_guid))


def netdev_shows_identity(saved: VfSnapshot, netdev: LinkInfo | None, *, ib: bool) -> bool:
    """Does the VF's netdev carry the admin MAC (Ethernet) / port GUID (IPoIB address) it should?"""
    if netdev is None:
        return False
    if ib:
        port = assigned_guid(saved.settings.port_guid)
        return port is None or netdev.address.lower().endswith(port)
    mac = assigned_mac(saved.settings.mac)
    return mac is None or netdev.address.lower() == mac


def must_rebind(saved: VfSnapshot, current_driver: str | None, netdev: LinkInfo | None, *,
                ib: bool, identity_changed: bool) -> bool:
    """A VF bound to mlx5_core whose netdev will not (or does not) show its MAC/GUID: rebind it.

    mlx5 reads a VF's admin MAC and GUIDs only at probe time; setting them on a bound VF changes the
    PF's view but not the netdev, until the VF is unbound and bound again."""
    if current_driver != NETDEV_DRIVER or saved.driver != NETDEV_DRIVER:
        return False
    if identity_changed:
        return True
    return netdev is not None and not netdev_shows_identity(saved, netdev, ib=ib)


def link_change(saved: VfSnapshot | PfSnapshot | RepSnapshot, now: LinkInfo) -> LinkChange:
    """MTU and admin state to set on a netdev so that it matches the snapshot."""
    mtu = saved.mtu if saved.mtu is not None and saved.mtu != now.mtu else None
    up = saved.up if saved.up is not None and saved.up != now.up else None
    return LinkChange(mtu=mtu, up=up)


def link_change_is_empty(change: LinkChange) -> bool:
    return change.mtu is None and change.up is None and change.name is None \
        and change.address is None


def rename_plan(current: dict[int, str], wanted: dict[int, str], temp: Callable[[int], str]
                ) -> list[tuple[str, str]]:
    """Renames that give each representor its saved name, in two phases: every one that must move
    goes to a temporary name first, then to its final one, so that two that swap names (udev
    named VF 1's representor what VF 0's was) never collide."""
    moves = {i: (current[i], wanted[i]) for i in sorted(wanted)
             if i in current and current[i] != wanted[i]}
    return ([(cur, temp(i)) for i, (cur, _) in moves.items()]
            + [(temp(i), want) for i, (_, want) in moves.items()])
