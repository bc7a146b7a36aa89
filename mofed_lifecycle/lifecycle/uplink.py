"""UPLINK_POLICY: the node's management uplink on a PF the reload takes down.

A driver reload destroys every netdev of the card; where the default route goes through a
ConnectX PF (directly, or through a bond or VLAN on it) the node loses its addresses and routes
and goes NotReady. Before the reload (preflight) the uplink is found; `restore` (the default)
saves its addresses, routes, MTU and bond membership in the journal (durable: a restart after a
crash re-applies them too), and they are re-applied as soon as that PF's netdev is back, before
its VFs are restored; `refuse` refuses the reload with that reason; `ignore` only warns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..doctor.gather import connectx_devices, default_route_dev, lowers
from ..host.netlink_types import LinkChange, NetlinkError, Route
from ..host.node import Tools
from .machine import Outcome

if TYPE_CHECKING:
    from .runner import Runner


def find_uplink(r: Runner) -> tuple[str, str, str] | None:
    """(the default route's netdev, the ConnectX PF netdev under it, the PF's PCI), or None."""
    tools = Tools(r.node.paths, r.node.commands)
    dev = default_route_dev(tools)
    if dev is None:
        return None
    devices, _gpus, pfs = connectx_devices(tools)
    for name in (dev, *lowers(tools, dev)):
        owner = next((d for d in devices if name in d.netdevs and d.pci in pfs), None)
        if owner is not None:
            return dev, name, owner.pci
    return None


def _save(r: Runner, name: str) -> dict[str, Any]:
    nl = r.node.netlink
    link = nl.link(name)
    return {"addresses": nl.addresses(name), "routes": [x.to_json() for x in nl.routes(name)],
            "mtu": link.mtu if link else None, "up": link.up if link else None,
            "master": nl.master(name)}


def check_uplink(r: Runner) -> Outcome | None:
    """In preflight, once the reload is allowed: REFUSED (policy refuse), or None to go on."""
    found = find_uplink(r)
    if found is None:
        r.journal.set(uplink=None)
        return None
    dev, pf, pci = found
    policy = r.config.uplink_policy
    what = f"the node's uplink {dev}" + (f" (over {pf})" if pf != dev else "") + \
        f" is on PF {pci}, which the reload takes down"
    if policy == "refuse":
        reason = f"{what} (UPLINK_POLICY=refuse)"
        r.journal.set(reason=reason, uplink=None)
        r.log.error("reload.refused", reason=reason, recheck_in_s=r.config.recheck_interval_s,
                    next="move the management network off the ConnectX PFs, or set "
                         "UPLINK_POLICY=restore (its addresses and routes re-applied as soon as "
                         "the PF is back)")
        return Outcome.REFUSED
    if policy == "ignore":
        r.journal.set(uplink=None)
        r.log.warning("uplink.not_protected", uplink=dev, pf=pf, pci=pci, why=what,
                      next="UPLINK_POLICY=ignore: nothing puts its addresses and routes back")
        return None
    saved = {"route_dev": dev, "pf_netdev": pf, "pf_pci": pci,
             "devs": {name: _save(r, name) for name in dict.fromkeys((pf, dev))},
             "restored": False}
    if not r.journal.commit(uplink=saved):
        r.require_saved("the uplink's configuration cannot be saved, nothing was touched")
    r.log.info("uplink.saved", uplink=dev, pf=pf, pci=pci, devs=saved["devs"],
               why=what + ": re-applied as soon as the PF is back, before its VFs")
    return None


def reapply_uplink(r: Runner, pci: str | None = None) -> None:
    """Put the saved uplink back (when PF `pci` is back; None: whatever is owed). Idempotent."""
    saved = r.journal.facts.get("uplink")
    if not isinstance(saved, dict) or saved.get("restored") or (
            pci is not None and pci != saved.get("pf_pci")):
        return
    nl = r.node.netlink
    done: list[str] = []
    failed: list[str] = []
    for name, want in saved["devs"].items():
        if nl.link(name) is None:
            failed.append(f"{name}: not back")
            continue
        try:
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
                    nl.add_address(name, cidr)
                    done.append(f"{name} address {cidr}")
            routes = set(nl.routes(name))
            for rj in want.get("routes") or []:
                route = Route.from_json(rj)
                if route not in routes:
                    nl.add_route(name, route)
                    done.append(f"{name} route {route.dst}")
        except (NetlinkError, OSError) as e:
            failed.append(f"{name}: {e}")
    if failed:
        r.log.error("uplink.not_restored", failed=failed, restored=done,
                    next="put them back by hand (ip addr add ... dev X; ip route add default "
                         "via ... dev X); the saved configuration is in the journal's uplink")
        return
    saved["restored"] = True
    r.journal.set(uplink=saved)
    r.log.info("uplink.restored", uplink=saved["route_dev"], pf=saved["pf_netdev"],
               applied=done)
