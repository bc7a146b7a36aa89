"""The saved uplink (UPLINK_POLICY=restore, lifecycle/uplink.py): whether it is still owed, and
putting it back on the node over netlink.

A save is owed while one of its PFs is not on the netdev it had when saved (gone, or a new one:
another ifindex), until it is all back. A save whose PFs have the netdevs they had then was never
taken down (its reload did not happen): it is dropped, never re-applied over what the
administrator did since. What the kernel refuses is tried again, REAPPLY_ATTEMPTS passes in all
(counted in the save, across restarts), then given up: dropped, its content logged.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..host.netlink_types import LinkChange, NetlinkError, Route
from ..sriov.snapshot import netdev_of

if TYPE_CHECKING:
    from .runner import Runner

_REAPPLY = threading.Lock()  # restore's PF threads call back at once
SWAP_STATES = ("unload-aux", "reload")
REAPPLY_ATTEMPTS = 3  # passes over what the kernel refused, across restarts, then given up


def owed(r: Runner) -> dict[str, Any] | None:
    """The saved uplink not put back yet, if any (a damaged one is said and dropped)."""
    saved = r.journal.facts.get("uplink")
    if saved is None or (isinstance(saved, dict) and saved.get("restored")):
        return None
    devs = saved.get("devs") if isinstance(saved, dict) else None
    if not (isinstance(devs, dict) and devs and all(isinstance(v, dict) for v in devs.values())):
        r.journal.set(uplink=None)
        r.log.error("uplink.save_damaged", saved=saved,
                    next="the saved uplink cannot be read: check the node's addresses and "
                         "default route (ip addr; ip route) and put back what is missing")
        return None
    return saved


def drop_save(r: Runner, saved: dict[str, Any], why: str) -> None:
    r.journal.set(uplink=None)
    r.log.info("uplink.save_dropped", uplink=saved.get("route_dev"), pfs=saved.get("pfs"),
               why=f"{why}: its PFs have the netdevs they had then (same ifindex), nothing of "
                   "it is owed; what is there now is the administrator's")


def pci_of(saved: dict[str, Any], name: str, want: dict[str, Any]) -> str | None:
    """The PF's PCI address of a saved entry (a save of the previous version has none per entry:
    its PF's is `pf_pci`); None for a netdev that is not a PF (a bond)."""
    if "pci" in want:
        return want["pci"] or None
    return saved.get("pf_pci") if name == saved.get("pf_netdev") else None


def pf_entries(saved: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(pci, want) for name, want in saved["devs"].items()
            if (pci := pci_of(saved, name, want))]


def _ifindex_now(r: Runner, pci: str) -> int | None:
    now = netdev_of(r.node.paths, pci)
    link = r.node.netlink.link(now) if now else None
    return link.ifindex if link else None


def _swapped_since_an_earlier_preflight(r: Runner) -> bool:
    """For a save of the previous version (no ifindex): did an earlier run go on from its
    preflight to unload or reload? (Unknown, no preflight in the kept history: yes.)"""
    history = getattr(r.journal, "history", [])
    started = getattr(r.journal, "run_started", float("inf"))
    earlier = [h.get("state") for h in history if h.get("at", 0) < started]
    if "preflight" not in earlier:
        return True
    last = len(earlier) - 1 - earlier[::-1].index("preflight")
    return any(s in SWAP_STATES for s in earlier[last:])


def taken_down(r: Runner, saved: dict[str, Any]) -> bool:
    """A PF of the save is not on the netdev it had when saved: gone, or a new one (another
    ifindex)."""
    entries = pf_entries(saved)
    legacy = [w for _, w in entries if w.get("ifindex") is None]  # the previous version's
    if legacy and _swapped_since_an_earlier_preflight(r):
        for w in legacy:  # decided once, and recorded (-1: no netdev has it): the history
            w["ifindex"] = -1  # moves on, this answer must not
        r.journal.set(uplink=saved)
    for pci, want in entries:
        now = _ifindex_now(r, pci)
        if now is None:
            return True
        if want.get("ifindex") is not None and now != want["ifindex"]:
            return True
    return not entries


def missing_pfs(r: Runner, saved: dict[str, Any]) -> list[str]:
    """The save's PFs (PCI addresses) that have no netdev now."""
    return [pci for pci, _ in pf_entries(saved) if _ifindex_now(r, pci) is None]


def pfs_present(r: Runner, saved: dict[str, Any]) -> bool:
    return not missing_pfs(r, saved)


def _now_name(r: Runner, saved: dict[str, Any], name: str, want: dict[str, Any]) -> str | None:
    """The netdev `name` was saved as, now: a PF's by its PCI address only (udev may have named
    it anew, and another port may hold its old name), a bond's by name; None if not there."""
    pci = pci_of(saved, name, want)
    now = netdev_of(r.node.paths, pci) if pci else name
    return now if now and r.node.netlink.link(now) is not None else None


def _apply(r: Runner, name: str, want: dict[str, Any], done: list[str],
           leased: list[str]) -> None:
    nl = r.node.netlink
    link = nl.link(name)
    if want.get("master") and nl.master(name) != want["master"]:
        nl.set_link(name, LinkChange(up=False))
        nl.set_master(name, want["master"])
        done.append(f"{name} master {want['master']}")
    if want.get("mtu") and link is not None and link.mtu != want["mtu"]:
        nl.set_link(name, LinkChange(mtu=want["mtu"]))
        done.append(f"{name} mtu {want['mtu']}")
    if want.get("up"):
        nl.set_link(name, LinkChange(up=True))
    have = set(nl.addresses(name))
    for cidr in want.get("addresses") or []:
        if cidr not in have:
            nl.add_address(name, cidr)  # permanent: a lease whose client is gone must not lapse
            done.append(f"{name} address {cidr}")
            if cidr in (want.get("lifetimes") or {}):
                leased.append(f"{cidr} on {name}")
    routes = set(nl.routes(name))
    # link-scope routes (no gateway) first: a gateway is reachable only through one of them
    for route in sorted((Route.from_json(x) for x in want.get("routes") or []),
                        key=lambda x: x.gateway is not None):
        if route not in routes:
            nl.add_route(name, route)
            done.append(f"{name} route {route.dst}" + (f" via {route.gateway}"
                                                        if route.gateway else ""))


def reapply_uplink(r: Runner, pci: str | None = None) -> None:
    """Put back what of the saved uplink is back: when PF `pci` is back (restore's callback, from
    a PF's thread: one at a time), or (None) whatever is owed. Idempotent; its progress is kept
    in the journal. Never raises: a failure is logged with what to do (a VF restore must not
    fail for it)."""
    with _REAPPLY:
        try:
            _reapply(r, pci)
        except Exception as e:  # noqa: BLE001 - a journal write, a netlink surprise: no harm
            r.log.error("uplink.not_restored", error=f"{type(e).__name__}: {e}",
                        next="put it back by hand (ip addr add ... dev X; ip route add default "
                             "via ... dev X); the saved configuration is in the journal's uplink")
            saved = r.journal.facts.get("uplink")
            if pci is None and isinstance(saved, dict):  # a pass that failed: counted
                saved["attempts"] = int(saved.get("attempts") or 0) + 1
                r.journal.set(uplink=saved)


def _reapply(r: Runner, pci: str | None) -> None:
    saved = owed(r)
    pcis = {p for p, _ in pf_entries(saved)} | set((saved.get("pfs") or {}).values()) | {
        saved.get("pf_pci")} if saved else set()
    if saved is None or (pci is not None and pci not in pcis):
        return
    applied: list[str] = list(saved.get("applied") or [])
    done: list[str] = []
    failed: list[str] = []
    missing: list[str] = []
    leased: list[str] = []
    for name, want in saved["devs"].items():
        if name in applied:
            continue
        now = _now_name(r, saved, name, want)
        if now is None:
            missing.append(name)
            continue
        try:
            _apply(r, now, want, done, leased)
            applied.append(name)
        except (NetlinkError, OSError) as e:
            failed.append(f"{now}: {e}")
    saved.update(applied=applied, restored=len(applied) == len(saved["devs"]))
    if failed and pci is None:  # a pass of the restore's end or a start: counted
        saved["attempts"] = int(saved.get("attempts") or 0) + 1
    r.journal.set(uplink=saved)
    if leased:
        r.log.warning("uplink.lease_made_permanent", addresses=leased,
                      why="DHCP leases when saved; re-added without a lifetime so that they do "
                          "not lapse if their client watched the old netdev",
                      next="a client that manages the new netdev (NetworkManager, systemd-"
                           "networkd) renews them; with dhclient, restart it on that netdev")
    if failed:
        r.log.error("uplink.not_restored", failed=failed, not_back=missing, restored=done,
                    attempts=saved.get("attempts", 0), of=REAPPLY_ATTEMPTS,
                    next="tried again (also by the next start) up to the attempts given, then "
                         "given up with the saved configuration logged: put it back by hand "
                         "(ip addr add ... dev X; ip route add default via ... dev X)")
    elif saved["restored"]:
        r.log.info("uplink.restored", uplink=saved["route_dev"], pfs=saved.get("pfs"),
                   applied=done)
    elif done:
        r.log.info("uplink.partly_restored", applied=done, waiting_for=missing)
    elif pci is None and missing:
        r.log.warning("uplink.not_back", waiting_for=missing,
                      next="re-applied as soon as its PF's netdev is back (the restore, or the "
                           "next start)")


def give_up(r: Runner, saved: dict[str, Any], why: str) -> None:
    """Dropped (never retried later over what the administrator may do), its content logged."""
    r.journal.set(uplink=None)
    r.log.error("uplink.given_up", uplink=saved.get("route_dev"), why=why,
                not_applied={n: w for n, w in saved["devs"].items()
                             if n not in (saved.get("applied") or [])},
                next="put these back by hand (ip addr add CIDR dev X; ip route add ... dev X; "
                     "ip link set X mtu N)")


def give_up_pfs(r: Runner, saved: dict[str, Any], pcis: list[str]) -> None:
    """PFs whose netdev did not come back within the wait: their part of the save is given up
    (logged), the rest stands; a save made only of them is dropped."""
    gone = {n: w for n, w in saved["devs"].items() if pci_of(saved, n, w) in pcis}
    if len(gone) == len([n for n, w in saved["devs"].items() if pci_of(saved, n, w)]):
        give_up(r, saved, f"its PFs {', '.join(pcis)} did not come back")
        return
    for name in gone:
        del saved["devs"][name]
    saved["restored"] = set(saved["devs"]) <= set(saved.get("applied") or [])
    r.journal.set(uplink=saved)
    r.log.error("uplink.given_up", uplink=saved.get("route_dev"),
                why=f"PF {', '.join(pcis)} did not come back: its part is given up",
                not_applied=gone, next="once the PF is back, put these back by hand")
