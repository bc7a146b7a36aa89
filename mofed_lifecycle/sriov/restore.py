"""Restore every VF from the snapshot: configure on the PF, bind once, wait by udev events, finish.

Per PF with VFs: if none exist, `sriov_drivers_autoprobe` is turned off so that `sriov_numvfs`
creates them unbound; every VF's admin settings (MAC, VLAN/QoS, trust, spoofchk, link state,
rates, GUIDs) are set through the PF; each VF is then bound exactly once to the driver it had
(mlx5_core, or vfio-pci through driver_override), and autoprobe is put back. VFs that already exist
are configured in place, and rebound only if their netdev does not show its MAC/GUID ("rebind"
fallback). The netdev work (MTU, up/down) runs on a bounded pool as each VF's netdev is announced
by udev. One VF's failure never stops the others: it is retried until the deadline, then named.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from ..host.netlink_types import LinkChange, NetlinkError, VfChange, VfSettings
from ..host.node import Node
from .binder import Binder, bind_vfs
from .model import PfSnapshot, Snapshot, VfSnapshot
from .plan import (
    NETDEV_DRIVER,
    NumvfsAction,
    identity_changes,
    link_change,
    link_change_is_empty,
    must_rebind,
    numvfs_action,
    unkept,
    unverifiable,
    vf_change,
)
from .readiness import Expected, Readiness, progress_line
from .representors import restore_representors
from .snapshot import driver_of, eswitch_mode, netdev_of, vf_pci

TRANSIENT = {errno.EBUSY, errno.EAGAIN, errno.ENODEV, errno.ENOENT, errno.ETIMEDOUT, errno.EINTR}
PROGRESS_EVERY_S = 5.0
SETTINGS_BATCH = 32  # VFs per netlink request (IFLA_VFINFO_LIST), well under a message's size
BIND_WORKERS = 16  # VF_BIND_WORKERS's default: VF bind writes in the kernel at once
POLL_S = 0.05  # the event wait's slice: PF workers' progress is checked between slices


class RestoreAborted(RuntimeError):
    pass


@dataclass
class RestoreResult:
    restored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # VF PCI -> why
    strategy: dict[str, str] = field(default_factory=dict)  # PF PCI -> what ran
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"restored": len(self.restored), "failed": self.failed,
                "strategy": self.strategy, "duration_s": round(self.duration_s, 4)}


def _transient(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in TRANSIENT


class Restorer:
    def __init__(self, node: Node, snapshot: Snapshot, *, deadline_s: float, workers: int,
                 stop: threading.Event, log: Any, bind_workers: int = BIND_WORKERS) -> None:
        self.node, self.snap, self.stop, self.log = node, snapshot, stop, log
        self.paths = node.paths
        self.deadline = time.monotonic() + deadline_s
        self.workers = workers
        self.binder = Binder(bind_workers)
        self.binding: set[str] = set()  # VFs whose bind is queued or in the kernel
        self.lock = threading.Lock()  # the writers' outcomes vs the restore's report
        self.result = RestoreResult()
        self.on_pf_back: Callable[[str], None] = lambda _pci: None  # (restore()'s)
        self.no_netdev: set[str] = set()  # VFs restored with no netdev work to do
        self.not_kept: dict[str, str] = {}  # VF PCI -> settings read back otherwise (still bound)

    def _pause(self, seconds: float) -> None:
        """tenacity's backoff: a wait that a stop cuts short."""
        self.stop.wait(seconds)

    # ---- primitives, each retried on transient errors until the deadline ------------------------
    def retrying(self, what: str, fn: Any, *args: Any) -> Any:
        left = max(0.0, self.deadline - time.monotonic())
        for attempt in Retrying(stop=stop_after_delay(left), reraise=True,
                                wait=wait_exponential(multiplier=0.01, max=0.5),
                                retry=retry_if_exception(_transient), sleep=self._pause):
            with attempt:
                if self.stop.is_set():
                    raise RestoreAborted(f"stopped while trying to {what}")
                return fn(*args)
        return None

    def write(self, path: Any, value: str) -> None:
        self.retrying(f"write {value} to {path}", self.node.sysfs.write, path, value)

    def bind(self, vf: VfSnapshot, driver: str) -> None:
        if driver == NETDEV_DRIVER:
            self.write(self.paths.pci_driver(driver) / "bind", vf.pci)
        else:  # vfio-pci and others: the way the kernel documents for a chosen driver
            self.write(self.paths.pci_device(vf.pci) / "driver_override", driver)
            self.write(self.paths.sys / "bus" / "pci" / "drivers_probe", vf.pci)

    def unbind(self, vf: VfSnapshot, driver: str) -> None:
        self.write(self.paths.pci_driver(driver) / "unbind", vf.pci)

    # ---- the plan, executed --------------------------------------------------------------------
    def run(self) -> RestoreResult:
        start = time.monotonic()
        events = self.node.netdev_events()  # subscribed before anything we do can cause one
        pfs = {p.pci: p for p in self.snap.pfs if p.netdev is not None}
        vfs = {vf.pci: vf for p in pfs.values() for vf in p.vfs if vf.driver == NETDEV_DRIVER}
        pf_jobs: dict[str, Future[None]] = {}
        finish: dict[str, Future[None]] = {}
        try:
            readiness = Readiness(events, lambda pci: netdev_of(self.paths, pci),
                                  lambda pci: driver_of(self.paths, pci))
            for pf in pfs.values():
                readiness.expect(pf.pci, pf.netdev, NETDEV_DRIVER)
            with ThreadPoolExecutor(max_workers=max(1, len(pfs)), thread_name_prefix="pf") as pfp, \
                    ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vf") as vfp:
                def started(e: Expected) -> None:  # each PF starts as soon as its netdev is back
                    if e.pci in pfs and e.pci not in pf_jobs:
                        pf_jobs[e.pci] = pfp.submit(self.restore_pf, pfs[e.pci], readiness)
                    elif e.pci in vfs and e.pci not in self.result.failed:
                        finish[e.pci] = vfp.submit(self.finish_vf, vfs[e.pci])

                def done() -> bool:  # a VF whose bind failed is not waited for
                    return (len(pf_jobs) == len(pfs) and all(f.done() for f in pf_jobs.values())
                            and not readiness.undelivered() and not self.binding
                            and not [p for p in readiness.pending()
                                     if p in vfs and p not in self.result.failed])

                self.wait(readiness, started, done, total=len(vfs))
                for pci, pf in pfs.items():
                    if pci not in pf_jobs:
                        self.fail_pf(pf, "its netdev did not come back after the reload")
                    elif (exc := pf_jobs[pci].exception(timeout=self.time_left() + 5)) is not None:
                        self.fail_pf(pf, str(exc))
                missing = set(readiness.pending()) - set(pfs)
                for pci in sorted(missing & set(vfs)):
                    self.result.failed.setdefault(
                        pci, "its netdev did not appear before the deadline")
                for pci, fut in finish.items():
                    exc = fut.exception()
                    if exc is not None:
                        self.result.failed.setdefault(pci, str(exc))
            with self.lock:  # from here no writer records anything (bind_one)
                self.binder.close()  # a bind still in the kernel is left there (binder.py)
                for pci in sorted(self.binding):
                    self.result.failed.setdefault(
                        pci, "its bind did not return before the deadline: its driver's probe "
                             "had not ended (see dmesg)")
            for pci, why in self.not_kept.items():
                self.result.failed.setdefault(pci, why)
            settled = set(finish) | {vf.pci for p in pfs.values() for vf in p.vfs
                                     if vf.driver != NETDEV_DRIVER or vf.pci in self.no_netdev}
            self.result.restored = sorted(p for p in settled if p not in self.result.failed)
        finally:
            with self.lock:
                self.binder.close()
            events.close()
        self.result.duration_s = time.monotonic() - start
        return self.result

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def wait(self, readiness: Readiness, started: Any, done: Any, *, total: int) -> None:
        """Hand every function that becomes ready to `started`, until `done()` or the deadline."""
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while not done() and not self.stop.is_set():
            now = time.monotonic()
            if now >= self.deadline:
                self.log.error("restore.deadline", missing=readiness.pending(),
                               next="these functions' netdevs never appeared: check dmesg for "
                                    "their probe errors; a restart of the daemon retries them")
                return
            if now >= next_progress:
                pending = readiness.pending()
                self.log.info("restore.progress",
                              progress=progress_line(total - len(pending), total, pending))
                next_progress = now + PROGRESS_EVERY_S
            # bounded: PF workers add expectations while we wait, and may finish without an event
            for e in readiness.poll(min(POLL_S, self.deadline - now)):
                started(e)

    def fail_pf(self, pf: PfSnapshot, why: str) -> None:
        self.log.error("restore.pf_failed", pf=pf.pci, why=why)
        for vf in pf.vfs:
            self.result.failed[vf.pci] = f"PF {pf.pci}: {why}"

    def restore_link(self, saved: PfSnapshot | VfSnapshot, name: str | None) -> None:
        netdev = netdev_of(self.paths, saved.pci) or name
        if netdev is None:
            raise NetlinkError(errno.ENODEV, f"{saved.pci} has no netdev")
        link = self.node.netlink.link(netdev)
        if link is None:
            raise NetlinkError(errno.ENODEV, f"{netdev} ({saved.pci}) is gone")
        change = link_change(saved, link)
        if not link_change_is_empty(change):
            self.node.netlink.set_link(netdev, change)

    def restore_pf(self, pf: PfSnapshot, readiness: Readiness) -> None:
        """On a PF worker, once the PF's netdev is back: its link, then its VFs."""
        self.on_pf_back(pf.pci)
        self.retrying(f"set the link of {pf.pci}", self.restore_link, pf, pf.netdev)
        dev = self.paths.pci_device(pf.pci)
        current = int((dev / "sriov_numvfs").read_text().strip() or 0)
        action = numvfs_action(pf.numvfs, current)
        if action is NumvfsAction.NONE:
            return
        autoprobe_off = action in (NumvfsAction.CREATE, NumvfsAction.RECREATE)
        self.result.strategy[pf.pci] = ("configure-then-bind" if autoprobe_off
                                        else "in-place")
        try:
            if action is NumvfsAction.RECREATE:
                self.log.warning("restore.numvfs_mismatch", pf=pf.pci, now=current, saved=pf.numvfs)
                self.write(dev / "sriov_numvfs", "0")
            if autoprobe_off:
                self.write(dev / "sriov_drivers_autoprobe", "0")
                self.write(dev / "sriov_numvfs", str(pf.numvfs))
            watch = readiness.watch(pf.pci)  # the representors' events, from before the switch
            to_bind = self.configure_vfs(pf, readiness)
            switched, rebound = self.ensure_eswitch(pf)
            bind_vfs(self, to_bind + rebound, readiness)
            if pf.representors:
                try:
                    restore_representors(self, pf, watch, switched=switched)
                except (OSError, RuntimeError, RestoreAborted) as e:
                    self.result.failed[f"{pf.pci}/representors"] = str(e)
                    self.log.error("restore.representors_failed", pf=pf.pci, error=str(e))
        finally:  # as it was, also when a killed predecessor left it off
            now = (dev / "sriov_drivers_autoprobe").read_text().strip() != "0"
            if now != pf.autoprobe:
                self.write(dev / "sriov_drivers_autoprobe", "1" if pf.autoprobe else "0")

    def ensure_eswitch(self, pf: PfSnapshot) -> tuple[bool, list[VfSnapshot]]:
        """Put the eswitch back in its saved mode while the VFs are unbound (mlx5 refuses the
        change otherwise): (switched, VFs that had to be unbound for it and need binding again)."""
        uplink = netdev_of(self.paths, pf.pci)
        now = eswitch_mode(self.paths, uplink)
        if pf.eswitch is None or now is None or now == pf.eswitch:
            return False, []
        rebound = [vf for vf in pf.vfs if driver_of(self.paths, vf.pci) == NETDEV_DRIVER]
        for vf in rebound:
            self.unbind(vf, NETDEV_DRIVER)
        self.write(self.paths.net(uplink) / "compat" / "devlink" / "mode", pf.eswitch)
        self.log.info("restore.eswitch", pf=pf.pci, mode=pf.eswitch, rebound=len(rebound))
        self.result.strategy[pf.pci] += f", eswitch {pf.eswitch} before binding"
        return True, rebound

    def configure_vfs(self, pf: PfSnapshot, readiness: Readiness) -> list[VfSnapshot]:
        """Admin settings through the PF, unbinds where needed; returns the VFs to bind."""
        pf_name = netdev_of(self.paths, pf.pci) or pf.netdev or ""
        current = {s.index: s for s in self.retrying(f"read VFs of {pf_name}",
                                                     self.node.netlink.vfs, pf_name)}
        vfs: list[VfSnapshot] = []
        for vf in pf.vfs:
            if vf_pci(self.paths, pf.pci, vf.index) == vf.pci:
                vfs.append(vf)
            else:
                self.vf_failed(pf, vf, f"VF {vf.index} of {pf.pci} is not at {vf.pci} any more")
        changes = {vf.index: vf_change(vf.settings, current.get(vf.index), ib=pf.ib)
                   for vf in vfs}
        self.apply_settings(pf, pf_name, {i: c for i, c in changes.items() if not c.is_empty()})
        rebinds = 0
        to_bind: list[VfSnapshot] = []
        for vf in vfs:
            if vf.pci in self.result.failed:
                continue
            try:
                driver = driver_of(self.paths, vf.pci)
                netdev = netdev_of(self.paths, vf.pci)
                link = self.node.netlink.link(netdev) if netdev else None
                rebind = must_rebind(vf, driver, link, ib=pf.ib,
                                     identity_changed=identity_changes(changes[vf.index]))
                if driver is not None and (driver != vf.driver or rebind):
                    self.unbind(vf, driver)
                    driver = None
                    rebinds += rebind
                if vf.driver is not None and driver is None:
                    to_bind.append(vf)
                elif vf.driver is not None and (vf.netdev is not None or netdev is not None):
                    readiness.expect(vf.pci, vf.netdev, vf.driver)
                else:  # bound as it was, no netdev here (a pod's namespace): nothing to finish
                    self.no_netdev.add(vf.pci)
            except (OSError, RestoreAborted) as e:
                self.vf_failed(pf, vf, str(e))
        if rebinds:
            self.result.strategy[pf.pci] += f" (+{rebinds} rebinds)"
        return to_bind

    def apply_settings(self, pf: PfSnapshot, pf_name: str, changes: dict[int, VfChange]) -> None:
        """Every VF's admin settings, a batch of VFs per netlink request; a refused batch is
        applied VF by VF so that the one refused VF is the one reported."""
        by_index = {vf.index: vf for vf in pf.vfs}
        indexes = sorted(changes)
        for start in range(0, len(indexes), SETTINGS_BATCH):
            batch = {i: changes[i] for i in indexes[start:start + SETTINGS_BATCH]}
            try:
                self.retrying(f"set {len(batch)} VFs of {pf_name}", self.node.netlink.set_vfs,
                              pf_name, batch)
                continue
            except (OSError, RestoreAborted):
                pass
            for i, change in batch.items():
                try:
                    self.retrying(f"set VF {i} of {pf_name}", self.node.netlink.set_vf,
                                  pf_name, i, change)
                except (OSError, RestoreAborted) as e:
                    self.vf_failed(pf, by_index[i], str(e))
        self.verify_settings(pf, pf_name, [by_index[i] for i in indexes])

    def verify_settings(self, pf: PfSnapshot, pf_name: str, vfs: list[VfSnapshot]) -> None:
        """Read every changed VF back: what the kernel did not keep is sent once more on its own,
        and a VF that still reads otherwise is reported failed naming the field (never a silent
        loss) — it is still bound, so that one setting never costs the VF itself."""
        vfs = [vf for vf in vfs if vf.pci not in self.result.failed]
        for attempt in (1, 2):
            if not vfs:
                return
            try:
                now = {s.index: s for s in self.retrying(f"read back VFs of {pf_name}",
                                                         self.node.netlink.vfs, pf_name)}
            except (OSError, RestoreAborted) as e:
                self.log.error("restore.verify_failed", pf=pf.pci, error=str(e),
                               next="the settings were sent but could not be read back: check "
                                    f"them with `ip link show {pf_name}`")
                return
            if attempt == 1:
                self.log_unverifiable(pf, vfs, now)
            wrong = {vf.index: unkept(vf.settings, now[vf.index], ib=pf.ib)
                     if vf.index in now else {"vf": ("reported", "missing")} for vf in vfs}
            vfs = [vf for vf in vfs if wrong[vf.index]]
            for vf in vfs:
                fields = ", ".join(f"{k} {want} (reads {got})"
                                   for k, (want, got) in wrong[vf.index].items())
                if attempt == 2:
                    self.not_kept[vf.pci] = (f"the kernel did not keep {fields} on VF {vf.index} "
                                             f"of {pf_name}: set it by hand (ip link set {pf_name} "
                                             f"vf {vf.index} ...) and check dmesg")
                    self.log.error("restore.vf_failed", vf=vf.pci, pf=pf.pci, index=vf.index,
                                   error=self.not_kept[vf.pci])
                    continue
                self.log.warning("restore.vf_not_kept", vf=vf.pci, pf=pf.pci, index=vf.index,
                                 fields=fields)
                try:
                    self.retrying(f"set VF {vf.index} of {pf_name} again",
                                  self.node.netlink.set_vf, pf_name, vf.index,
                                  vf_change(vf.settings, now.get(vf.index), ib=pf.ib))
                except (OSError, RestoreAborted) as e:
                    self.not_kept[vf.pci] = str(e)

    def log_unverifiable(self, pf: PfSnapshot, vfs: list[VfSnapshot],
                         now: dict[int, VfSettings]) -> None:
        """Once per PF: saved settings the driver does not report back, so cannot be checked."""
        blind = sorted({f for vf in vfs if vf.index in now
                        for f in unverifiable(vf.settings, now[vf.index], ib=pf.ib)})
        if blind:
            self.log.warning("restore.unverifiable", pf=pf.pci, fields=blind,
                             why="the driver does not report them in the PF's VF list: they "
                                 "were sent, but cannot be read back")

    def vf_failed(self, pf: PfSnapshot, vf: VfSnapshot, why: str) -> None:
        self.result.failed[vf.pci] = why
        self.log.error("restore.vf_failed", vf=vf.pci, pf=pf.pci, index=vf.index, error=why)

    def finish_vf(self, vf: VfSnapshot) -> None:
        """On a pool worker: MTU and admin state on the VF's netdev, name resolved now (both are
        idempotent on the kernel side: no read first, one request per VF)."""
        change = LinkChange(mtu=vf.mtu, up=vf.up)
        if link_change_is_empty(change):
            return

        def apply() -> None:
            netdev = netdev_of(self.paths, vf.pci)
            if netdev is None:
                raise NetlinkError(errno.ENODEV, f"{vf.pci} has no netdev")
            self.node.netlink.set_link(netdev, change)

        self.retrying(f"set the link of {vf.pci}", apply)


def restore(node: Node, snapshot: Snapshot, *, deadline_s: float, workers: int,
            stop: threading.Event, log: Any, bind_workers: int = BIND_WORKERS,
            on_pf_back: Callable[[str], None] | None = None) -> RestoreResult:
    """`on_pf_back(pci)`: called as each PF's netdev is back, before anything of it is restored."""
    r = Restorer(node, snapshot, deadline_s=deadline_s, workers=workers, stop=stop, log=log,
                 bind_workers=bind_workers)
    r.on_pf_back = on_pf_back or r.on_pf_back  # (the uplink is re-applied there)
    return r.run()
