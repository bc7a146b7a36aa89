"""Switchdev: give every VF representor its saved name, MTU and state once udev is done with it.

Representors appear when the eswitch goes back to switchdev, with the kernel's names, and udev
renames them; only then are they renamed to the saved names — in two phases (temporary names
first) so that two representors that swapped names never collide.
"""

from __future__ import annotations

import errno
import queue
from typing import TYPE_CHECKING

from ..host.netlink_types import LinkChange, NetlinkError
from ..host.udev import NetdevEvent
from .model import PfSnapshot
from .plan import link_change, link_change_is_empty, rename_plan
from .snapshot import representors

if TYPE_CHECKING:
    from .restore import Restorer

EVENT_SLICE_S = 0.05  # bounded event wait: the deadline and a stop are checked between slices


def temp_name(pf: PfSnapshot, index: int) -> str:
    return f"rtmp{pf.pci.rsplit('.', 1)[1]}x{index}"  # at most 11 characters


def rename_representor(r: Restorer, pf: PfSnapshot, old: str, new: str) -> None:
    """Rename `old` to `new`, down. udev keeps a name it gave as an alternative name once the
    netdev is renamed away from it, and the kernel refuses (EEXIST) a rename to any netdev's
    altname: if `new` is an altname of one of this PF's representors, it is removed first."""
    for attempt in (1, 2):
        holder = r.node.netlink.link(new)  # resolves a name or an altname
        if holder is not None and holder.name != new and new in holder.altnames:
            ours = set(representors(r.paths, pf.pci).values())
            if holder.name not in ours:
                raise RuntimeError(
                    f"cannot name representor {old} {new}: {new} is an alternative name of "
                    f"{holder.name}, which is not a representor of {pf.pci}; remove it (ip link "
                    f"property del dev {holder.name} altname {new}) and restart")
            r.node.netlink.del_altname(holder.name, new)
            r.log.info("restore.altname_removed", pf=pf.pci, netdev=holder.name, altname=new)
        try:
            r.node.netlink.set_link(old, LinkChange(name=new, up=False))
            return
        except NetlinkError as e:
            # udev adds an altname asynchronously (after the move event): one that landed
            # between the check and the rename is found and removed on the second pass
            if e.errno != errno.EEXIST or attempt == 2:
                raise


def restore_representors(r: Restorer, pf: PfSnapshot, events: queue.Queue[NetdevEvent], *,
                         switched: bool) -> None:
    wanted = {rep.index: rep for rep in pf.representors}
    announced: set[str] = set()  # names udev has finished with (add/move seen)

    def settled() -> dict[int, str] | None:
        now = representors(r.paths, pf.pci)
        ok = all(i in now and (now[i] in announced or (not switched and now[i] == rep.name))
                 for i, rep in wanted.items())
        return now if ok else None

    while (current := settled()) is None:
        if r.stop.is_set() or r.time_left() <= 0:
            missing = sorted(set(wanted) - set(representors(r.paths, pf.pci)))
            raise RuntimeError(f"representors of {pf.pci} not ready before the deadline "
                               f"(missing VF indexes {missing or 'none; udev never finished'})")
        try:
            ev = events.get(timeout=min(EVENT_SLICE_S, r.time_left()))
        except queue.Empty:
            continue
        if ev.action in ("add", "move"):
            announced.add(ev.name)
    plan = rename_plan(current, {i: rep.name for i, rep in wanted.items()},
                       lambda i: temp_name(pf, i))
    for old, new in plan:
        r.retrying(f"rename {old} to {new}", rename_representor, r, pf, old, new)
    for rep in wanted.values():
        link = r.node.netlink.link(rep.name)
        if link is None:
            raise RuntimeError(f"representor {rep.name} of {pf.pci} vanished")
        change = link_change(rep, link)
        if not link_change_is_empty(change):
            r.retrying(f"set the link of {rep.name}", r.node.netlink.set_link, rep.name, change)
    r.log.info("restore.representors", pf=pf.pci, count=len(wanted), renamed=len(plan) // 2)
