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
from ..host.netlink_types import Route
from ..host.node import Tools
from ..sriov.snapshot import netdev_of
from .machine import Outcome
from .uplink_apply import (
    REAPPLY_ATTEMPTS,
    drop_save,
    give_up,
    give_up_pfs,
    missing_pfs,
    owed,
    pf_entries,
    pfs_present,
    reapply_uplink,
    taken_down,
)

if TYPE_CHECKING:
    from .runner import Runner

PROGRESS_EVERY_S = 10.0
RETRY_PAUSE_S = 1.0  # before the 2nd pass over what the kernel refused; x2 before the 3rd
__all__ = ["check_uplink", "finish_uplink", "reapply_uplink", "reset_for_swap",
           "startup_uplink"]


def find_uplink(r: Runner) -> UplinkPath | None:
    tools = Tools(r.node.paths, r.node.commands)
    devices, _gpus, pfs = connectx_devices(tools)
    return uplink_path(tools, devices, pfs, r.config.node_ip)


def _save(r: Runner, name: str, pci: str | None) -> dict[str, Any]:
    nl = r.node.netlink
    link = nl.link(name)
    return {"pci": pci, "ifindex": link.ifindex if link else None,
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
        drop_save(r, kept, "saved before a reload that never took its PF down")
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
    elif policy == "restore" and found.dies_with_pf:
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
        return None
    if kept is not None:  # (all of it owed again once the swap starts: reset_for_swap)
        return None
    pf, pci = found.first
    devs = {name: _save(r, name, p) for name, p in found.pfs.items()}
    if dev not in devs:
        devs[dev] = _save(r, dev, None)
    family = 4 if found.source == "/proc/net/route" else 6
    if found.carries == "default route" and not found.default_by_ra and not any(
            x.get("dst") == "default" and Route.from_json(x).family == family
            for d in devs.values() for x in d["routes"]):
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


def reset_for_swap(r: Runner) -> None:
    """The swap starts (before the first unload): a save kept from an earlier reload is owed in
    full again, this reload takes down what the last one had put back (reset here, not at
    preflight: a run that stops before the swap must not make the save re-apply again)."""
    if (kept := owed(r)) is not None and (kept.get("applied") or kept.get("attempts")):
        kept["applied"], kept["attempts"] = [], 0
        if not r.journal.commit(uplink=kept):
            r.require_saved("no module is unloaded")


def startup_uplink(r: Runner) -> None:
    """At start: a save owed by a killed predecessor whose reload completed (its PFs back, on new
    netdevs) is put back now, not only once this run reaches its restore (a build or a failing
    step may come first). One its reload never took down is dropped."""
    saved = owed(r)
    if saved is None:
        return
    try:
        if not taken_down(r, saved):
            drop_save(r, saved, "saved before a reload that did not happen")
        elif len(missing_pfs(r, saved)) < len(pf_entries(saved)):  # what is back goes back
            reapply_uplink(r)
            if (saved := owed(r)) is not None and saved.get("attempts", 0) >= REAPPLY_ATTEMPTS:
                give_up(r, saved, f"the kernel refused it {REAPPLY_ATTEMPTS} times")
    except Exception as e:  # noqa: BLE001 - logged with what to do; the start goes on
        r.log.error("uplink.not_restored", error=f"{type(e).__name__}: {e}",
                    next="put it back by hand; the saved configuration is in the journal")


def finish_uplink(r: Runner, *, stopping: bool = False) -> None:
    """After the restore (whatever it did, even nothing), on a refused re-check and after the
    stop's reload (`stopping`: its waits are not cut short by the stop): a saved uplink still
    owed is put back. Its PFs that no VF restore waited for (a restart after a crash with no VF
    owed, a PF without VFs) are waited for, by netdev events, within VF_RESTORE_TIMEOUT_SEC, while
    the NIC driver is loaded; a PF still not back then has its part given up. What the kernel
    refuses is tried again (1 s, 2 s; REAPPLY_ATTEMPTS passes, counted across restarts), then
    given up. Never raises (the uplink is the node's, not a reason to fail the driver)."""
    saved = owed(r)
    if saved is None:
        return
    try:
        if not taken_down(r, saved):
            drop_save(r, saved, "saved before a reload that did not happen")
            return
        if "mlx5_core" not in read_module_facts(r.node.paths):
            return  # (a failed swap left no NIC driver: owed, put back after the next reload)
        if 0 < len(missing_pfs(r, saved)) < len(pf_entries(saved)):
            reapply_uplink(r)  # what is back goes back before any wait (a bond's other port)
            if (saved := owed(r)) is None:
                return
        pcis = sorted(set(missing_pfs(r, saved)) - set(r.restore_waited))
        # (not on the stop: its grace period has no room for a second wait)
        if pcis and not stopping and not _wait_for_pfs(r, pcis, r.config.vf_restore_timeout_s,
                                                       r.stop) and r.stop.is_set():
            return  # cut short: owed, the next start goes on
        if (saved := owed(r)) is None:
            return
        if missing := missing_pfs(r, saved):  # waited for (here, or by the VF restore)
            if stopping or r.stop.is_set():
                return  # (or cut short: owed, the next start goes on)
            give_up_pfs(r, saved, missing)
        while (saved := owed(r)) is not None and pfs_present(r, saved):
            before = int(saved.get("attempts") or 0)
            reapply_uplink(r)
            if (saved := owed(r)) is None:
                return
            attempts = int(saved.get("attempts") or 0)
            if attempts == before:  # nothing refused: what is left has no netdev (a bond gone)
                give_up(r, saved, "what is left of it has no netdev now (see uplink.not_back)")
                return
            if attempts >= REAPPLY_ATTEMPTS:
                give_up(r, saved, f"the kernel refused it {attempts} times")
                return
            if r.stop.is_set() and not stopping:
                return  # owed: the next start tries again
            _pause(None if stopping else r.stop, attempts * RETRY_PAUSE_S)
    except Exception as e:  # noqa: BLE001 - logged with what to do; the node stays served
        r.log.error("uplink.not_restored", error=f"{type(e).__name__}: {e}",
                    next="put it back by hand; the saved configuration is in the journal")


def _pause(stop: threading.Event | None, seconds: float) -> None:
    """No event says the kernel would take it now: a bounded pause (cut short by `stop`)."""
    (stop or threading.Event()).wait(seconds)


def _wait_for_pfs(r: Runner, pcis: list[str], deadline_s: float,
                  stop: threading.Event | None) -> bool:
    """Until every PF in `pcis` has a netdev (True), the deadline or `stop` (False)."""
    events = r.node.netdev_events()  # subscribed before the check: no appearance is missed
    try:
        start = time.monotonic()
        deadline, progress = start + deadline_s, start + PROGRESS_EVERY_S
        while missing := [p for p in pcis if netdev_of(r.node.paths, p) is None]:
            now = time.monotonic()
            if now >= deadline or (stop is not None and stop.is_set()):
                r.log.error("uplink.pf_not_back", pfs=missing, waited_s=round(now - start, 1),
                            next="check dmesg for the PF's probe error; its part of the saved "
                                 "uplink is given up (logged) unless the wait was cut short")
                return False
            if now >= progress:
                r.log.info("uplink.waiting", pfs=missing, waited_s=round(now - start, 1),
                           deadline_s=deadline_s)
                progress = now + PROGRESS_EVERY_S
            events.poll(min(1.0, deadline - now))  # any netdev event: look again
        return True
    finally:
        events.close()
