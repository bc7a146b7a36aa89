"""UPLINK_POLICY: the node's management uplink on a PF the reload takes down.

A driver reload destroys every netdev of the card; where the default route goes through a
ConnectX PF (directly, or through a bond on one or more of them) the node loses its addresses and
routes and goes NotReady. Before the reload (preflight) the uplink is found; `restore` (the
default) saves its addresses, routes, MTU and bond membership in the journal (durable: a restart
after a crash re-applies them too, and a later preflight never replaces a saved uplink that is
not back yet with what the crash left), and they are re-applied as soon as that PF's netdev is
back (found by its PCI address: udev may name it differently), before its VFs are restored;
`refuse` refuses the reload with that reason; `ignore` only warns. A VLAN or macvlan stacked
directly on a PF dies with it and is not recreated: under `restore` that reload is refused.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ..doctor.gather import connectx_devices
from ..doctor.uplink_path import UplinkPath, uplink_path
from ..host.modules import read_module_facts
from ..host.netlink_types import LinkChange, NetlinkError, Route
from ..host.node import Tools
from ..sriov.snapshot import netdev_of
from .machine import Outcome

if TYPE_CHECKING:
    from .runner import Runner

PROGRESS_EVERY_S = 10.0
_REAPPLY = threading.Lock()  # restore's PF threads call back at once


def find_uplink(r: Runner) -> UplinkPath | None:
    tools = Tools(r.node.paths, r.node.commands)
    devices, _gpus, pfs = connectx_devices(tools)
    return uplink_path(tools, devices, pfs, r.config.node_ip)


def owed(r: Runner) -> dict[str, Any] | None:
    """The saved uplink not put back yet, if any."""
    saved = r.journal.facts.get("uplink")
    return saved if isinstance(saved, dict) and not saved.get("restored") else None


def _save(r: Runner, name: str, pci: str | None) -> dict[str, Any]:
    nl = r.node.netlink
    link = nl.link(name)
    return {"pci": pci, "ifindex": link.ifindex if link else None, "saved_at": time.time(),
            "addresses": nl.addresses(name),
            "lifetimes": {k: list(v) for k, v in nl.address_lifetimes(name).items()},
            "routes": [x.to_json() for x in nl.routes(name)],
            "mtu": link.mtu if link else None, "up": link.up if link else None,
            "master": nl.master(name)}


def check_uplink(r: Runner) -> Outcome | None:
    """In preflight, once the reload is allowed: REFUSED (policy refuse, or an uplink the policy
    restore cannot put back), or None to go on."""
    kept = owed(r)
    if kept is not None and not taken_down(r, kept):
        drop_save(r, kept, "a reload that never took its PF down")
        kept = None
    found = find_uplink(r)
    if kept is not None:  # a crash after the reload took it down: what is there now is not it
        r.log.warning("uplink.kept", uplink=kept["route_dev"], pfs=kept.get("pfs"),
                      now=found.route_dev if found else None,
                      why="saved before an earlier reload and not put back yet: kept, and "
                          "re-applied as soon as its PF is back")
    if found is None:
        if kept is None:
            r.journal.set(uplink=None)
        _reload_again(r, kept)
        return None
    policy = r.config.uplink_policy
    dev, pcis = found.route_dev, sorted(set(found.pfs.values()))
    what = f"the node's uplink {dev} ({found.carries})" + (f" (over {', '.join(found.pfs)})"
                                         if list(found.pfs) != [dev] else "") + \
        f" is on PF {', '.join(pcis)}, which the reload takes down"
    refusal = None
    if policy == "refuse":
        refusal = (f"{what} (UPLINK_POLICY=refuse)",
                   "move the management network off the ConnectX PFs, or set UPLINK_POLICY="
                   "restore (its addresses and routes re-applied as soon as the PF is back)")
    elif policy == "restore" and found.dies_with_pf and kept is None:
        refusal = (f"{what}, and {', '.join(found.dies_with_pf)} is stacked on the PF (a VLAN "
                   "or macvlan): destroyed with it, and not recreated by the daemon",
                   "move the management network off the ConnectX PFs, or set UPLINK_POLICY="
                   "ignore and recreate it after the reload yourself")
    if refusal is not None:
        reason, fix = refusal
        r.journal.set(reason=reason)
        r.log.error("reload.refused", reason=reason, recheck_in_s=r.config.recheck_interval_s,
                    next=fix)
        return Outcome.REFUSED
    if policy == "ignore":
        r.log.warning("uplink.not_protected", uplink=dev, pfs=found.pfs, why=what,
                      next="UPLINK_POLICY=ignore: nothing puts its addresses and routes back")
        if kept is None:
            r.journal.set(uplink=None)
        _reload_again(r, kept)
        return None
    if kept is not None:
        _reload_again(r, kept)
        return None
    pf, pci = found.first
    devs = {name: _save(r, name, p) for name, p in found.pfs.items()}
    if dev not in devs:
        devs[dev] = _save(r, dev, None)
    if found.carries == "default route" and not any(
            x.get("dst") == "default" for d in devs.values() for x in d["routes"]):
        reason = (f"{what}, and its default route cannot be saved for a re-apply (a multipath "
                  "route, or one this daemon cannot read back)")
        r.journal.set(reason=reason)
        r.log.error("reload.refused", reason=reason, recheck_in_s=r.config.recheck_interval_s,
                    next="give the default route a single next hop on that netdev, move it off "
                         "the ConnectX PFs, or set UPLINK_POLICY=ignore and restore it yourself")
        return Outcome.REFUSED
    saved = {"route_dev": dev, "pf_netdev": pf, "pf_pci": pci, "pfs": found.pfs,
             "devs": devs, "applied": [], "restored": False}
    if not r.journal.commit(uplink=saved):
        r.require_saved("the uplink's configuration cannot be saved, nothing was touched")
    r.log.info("uplink.saved", uplink=dev, pfs=found.pfs, devs=devs,
               why=what + ": re-applied as soon as the PF is back, before its VFs")
    return None


def _reload_again(r: Runner, kept: dict[str, Any] | None) -> None:
    """A reload goes ahead with a save kept from an earlier one: all of it is owed again (this
    reload takes down what the last one had put back)."""
    if kept is not None:
        kept["applied"] = []
        if not r.journal.commit(uplink=kept):
            r.require_saved("the uplink's configuration cannot be saved, nothing was touched")
    return None


def drop_save(r: Runner, saved: dict[str, Any], why: str) -> None:
    r.journal.set(uplink=None)
    r.log.info("uplink.save_dropped", uplink=saved.get("route_dev"), pfs=saved.get("pfs"),
               why=f"saved before {why}: its PFs have the netdevs they had then (same "
                   "ifindex), nothing of it was lost; what is there now is the administrator's")


def _pci_of(saved: dict[str, Any], name: str, want: dict[str, Any]) -> str | None:
    """The PF's PCI address of a saved entry (a save of the previous version has none per entry:
    its PF's is `pf_pci`); None for a netdev that is not a PF (a bond)."""
    if "pci" in want:
        return want["pci"] or None
    return saved.get("pf_pci") if name == saved.get("pf_netdev") else None


def taken_down(r: Runner, saved: dict[str, Any]) -> bool:
    """A PF of the save lost the netdev it had when saved (gone, or a new one: another ifindex),
    or that cannot be told (a save of the previous version): its configuration is owed."""
    pfs = [(pci, want) for name, want in saved.get("devs", {}).items()
           if (pci := _pci_of(saved, name, want))]
    for pci, want in pfs:
        now = netdev_of(r.node.paths, pci)
        link = r.node.netlink.link(now) if now else None
        if want.get("ifindex") is None or link is None or link.ifindex != want["ifindex"]:
            return True
    return not pfs


def _now_name(r: Runner, saved: dict[str, Any], name: str, want: dict[str, Any]) -> str | None:
    """The netdev `name` was saved as, now: a PF's by its PCI address only (udev may have named
    it anew, and another port may hold its old name), a bond's by name; None if not there."""
    pci = _pci_of(saved, name, want)
    now = netdev_of(r.node.paths, pci) if pci else name
    return now if now and r.node.netlink.link(now) is not None else None


def _apply(r: Runner, name: str, want: dict[str, Any], done: list[str]) -> None:
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
    leases = want.get("lifetimes") or {}
    for cidr in want.get("addresses") or []:
        if cidr in have:
            continue
        lifetime = None
        if cidr in leases:  # what was left of its lease when saved, less the time since
            spent = max(0, int(time.time() - float(want.get("saved_at") or time.time())))
            valid, preferred = (int(x) for x in leases[cidr])
            if valid - spent <= 0:
                done.append(f"{name} address {cidr} not re-added: its lease ran out during the "
                            "reload (its DHCP client gets a new one)")
                continue
            lifetime = (valid - spent, max(0, preferred - spent))
        nl.add_address(name, cidr, lifetime)
        done.append(f"{name} address {cidr}" + (f" (lease {lifetime[0]} s left)"
                                                 if lifetime else ""))
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
    a PF's thread: one at a time), or (None) whatever is owed, the last call of a restore: what is
    still missing is an error. Idempotent; its progress is kept in the journal. Never raises: a
    failure is logged with what to do (a VF restore must not fail for it)."""
    with _REAPPLY:
        try:
            _reapply(r, pci)
        except Exception as e:  # noqa: BLE001 - a damaged save, a journal write: said, no harm
            r.log.error("uplink.not_restored", error=f"{type(e).__name__}: {e}",
                        next="put it back by hand (ip addr add ... dev X; ip route add default "
                             "via ... dev X); the saved configuration is in the journal's uplink")


def _reapply(r: Runner, pci: str | None) -> None:
    saved = owed(r)
    pfs = saved.get("pfs") or {saved.get("pf_netdev"): saved.get("pf_pci")} if saved else {}
    if saved is None or (pci is not None and pci not in pfs.values()):
        return
    applied: list[str] = list(saved.get("applied") or [])
    done: list[str] = []
    failed: list[str] = []
    missing: list[str] = []
    for name, want in saved["devs"].items():
        if name in applied:
            continue
        now = _now_name(r, saved, name, want)
        if now is None:
            missing.append(name)
            continue
        try:
            _apply(r, now, want, done)
            applied.append(name)
        except (NetlinkError, OSError) as e:
            failed.append(f"{now}: {e}")
    saved.update(applied=applied, restored=len(applied) == len(saved["devs"]))
    r.journal.set(uplink=saved)
    if failed or (pci is None and missing):
        r.log.error("uplink.not_restored", failed=failed, not_back=missing, restored=done,
                    next="put them back by hand (ip addr add ... dev X; ip route add default "
                         "via ... dev X); the saved configuration is in the journal's uplink; "
                         "a restart of the daemon retries it")
    elif saved["restored"]:
        r.log.info("uplink.restored", uplink=saved["route_dev"], pfs=pfs, applied=done)
    elif done:
        r.log.info("uplink.partly_restored", applied=done, waiting_for=missing)


def finish_uplink(r: Runner) -> None:
    """After the restore (whatever it did, even nothing): a saved uplink still owed is put back.
    Its PFs that no VF restore waited for (a restart after a crash with no VF owed, a PF without
    VFs) are waited for, by netdev events, within VF_RESTORE_TIMEOUT_SEC, while
    the NIC driver is loaded and no stop is asked; never raises (the uplink is the node's, not a
    reason to fail the driver)."""
    saved = owed(r)
    if saved is None:
        return
    pcis = set((saved.get("pfs") or {}).values()) or {saved.get("pf_pci")}
    try:
        if not taken_down(r, saved):
            drop_save(r, saved, "a reload that did not happen (or did not take its PF down)")
            return
        wait = sorted(p for p in pcis if p and p not in r.restore_waited)
        if wait and "mlx5_core" in read_module_facts(r.node.paths):
            _wait_for_pfs(r, wait, r.config.vf_restore_timeout_s)
        reapply_uplink(r)
    except Exception as e:  # noqa: BLE001 - logged with what to do; the node stays served
        r.log.error("uplink.not_restored", error=str(e),
                    next="put it back by hand; the saved configuration is in the journal")


def _wait_for_pfs(r: Runner, pcis: list[str], deadline_s: float) -> None:
    events = r.node.netdev_events()  # subscribed before the check: no appearance is missed
    try:
        start = time.monotonic()
        deadline, progress = start + deadline_s, start + PROGRESS_EVERY_S
        while missing := [p for p in pcis if netdev_of(r.node.paths, p) is None]:
            now = time.monotonic()
            if now >= deadline or r.stop.is_set():
                r.log.error("uplink.pf_not_back", pfs=missing, waited_s=round(now - start, 1),
                            next="check dmesg for the PF's probe error; the uplink's saved "
                                 "configuration is re-applied at the next start")
                return
            if now >= progress:
                r.log.info("uplink.waiting", pfs=missing, waited_s=round(now - start, 1),
                           deadline_s=deadline_s)
                progress = now + PROGRESS_EVERY_S
            events.poll(min(1.0, deadline - now))  # any netdev event: look again
    finally:
        events.close()
