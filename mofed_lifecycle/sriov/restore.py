"""Restore every VF from the snapshot: configure on the PF, bind once, wait by udev events, finish.

Per PF with VFs: if none exist, `sriov_drivers_autoprobe` is turned off so that `sriov_numvfs`
creates them unbound; every VF's admin settings (MAC, VLAN/QoS, trust, spoofchk, link state,
rates, GUIDs) are set through the PF; each VF is then bound exactly once to the driver it had
(mlx5_core, or vfio-pci through driver_override), and autoprobe is put back. VFs that already exist
are configured in place, and rebound only if their netdev does not show its MAC/GUID ("rebind"
fallback). The netdev work (MTU, up/down) runs on a bounded pool as each VF's netdev is announced
by udev. One VF's failure never stops the others: it is retried until the deadline, then reported
by PCI address.
"""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from ..host.netlink_types import NetlinkError
from ..host.node import Node
from .model import PfSnapshot, Snapshot, VfSnapshot
from .plan import (
    NETDEV_DRIVER,
    NumvfsAction,
    identity_changes,
    link_change,
    link_change_is_empty,
    must_rebind,
    numvfs_action,
    vf_change,
)
from .readiness import Expected, Readiness, progress_line
from .snapshot import driver_of, netdev_of, vf_pci

TRANSIENT = {errno.EBUSY, errno.EAGAIN, errno.ENODEV, errno.ENOENT, errno.ETIMEDOUT, errno.EINTR}
PROGRESS_EVERY_S = 5.0
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
                 stop: threading.Event, log: Any) -> None:
        self.node, self.snap, self.stop, self.log = node, snapshot, stop, log
        self.paths = node.paths
        self.deadline = time.monotonic() + deadline_s
        self.workers = workers
        self.result = RestoreResult()
        self.no_netdev: set[str] = set()  # VFs restored with no netdev work to do

    # ---- primitives, each retried on transient errors until the deadline ------------------------
    def retrying(self, what: str, fn: Any, *args: Any) -> Any:
        left = max(0.0, self.deadline - time.monotonic())
        for attempt in Retrying(stop=stop_after_delay(left), reraise=True,
                                wait=wait_exponential(multiplier=0.01, max=0.5),
                                retry=retry_if_exception(_transient), sleep=self.stop.wait):
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

                def done() -> bool:
                    return (len(pf_jobs) == len(pfs) and all(f.done() for f in pf_jobs.values())
                            and not readiness.undelivered()
                            and not [p for p in readiness.pending() if p in vfs])

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
            settled = set(finish) | {vf.pci for p in pfs.values() for vf in p.vfs
                                     if vf.driver != NETDEV_DRIVER or vf.pci in self.no_netdev}
            self.result.restored = sorted(p for p in settled if p not in self.result.failed)
        finally:
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
            self.configure_vfs(pf, readiness)
        finally:  # as it was, also when a killed predecessor left it off
            now = (dev / "sriov_drivers_autoprobe").read_text().strip() != "0"
            if now != pf.autoprobe:
                self.write(dev / "sriov_drivers_autoprobe", "1" if pf.autoprobe else "0")

    def configure_vfs(self, pf: PfSnapshot, readiness: Readiness) -> None:
        pf_name = netdev_of(self.paths, pf.pci) or pf.netdev or ""
        current = {s.index: s for s in self.retrying(f"read VFs of {pf_name}",
                                                     self.node.netlink.vfs, pf_name)}
        rebinds = 0
        for vf in pf.vfs:
            try:
                if vf_pci(self.paths, pf.pci, vf.index) != vf.pci:
                    raise RuntimeError(f"VF {vf.index} of {pf.pci} is not at {vf.pci} any more")
                change = vf_change(vf.settings, current.get(vf.index), ib=pf.ib)
                if not change.is_empty():
                    self.retrying(f"set VF {vf.index} of {pf_name}", self.node.netlink.set_vf,
                                  pf_name, vf.index, change)
                driver = driver_of(self.paths, vf.pci)
                netdev = netdev_of(self.paths, vf.pci)
                link = self.node.netlink.link(netdev) if netdev else None
                rebind = must_rebind(vf, driver, link, ib=pf.ib,
                                     identity_changed=identity_changes(change))
                if driver is not None and (driver != vf.driver or rebind):
                    self.unbind(vf, driver)
                    driver = None
                    rebinds += rebind
                fresh = driver is None
                if vf.driver is not None and fresh:
                    readiness.expect(vf.pci, vf.netdev, vf.driver, check_now=False)
                    self.bind(vf, vf.driver)
                elif vf.driver is not None and (vf.netdev is not None or netdev is not None):
                    readiness.expect(vf.pci, vf.netdev, vf.driver)
                else:  # bound as it was, no netdev here (a pod's namespace): nothing to finish
                    self.no_netdev.add(vf.pci)
            except (OSError, RuntimeError, RestoreAborted) as e:
                self.result.failed[vf.pci] = str(e)
                self.log.error("restore.vf_failed", vf=vf.pci, pf=pf.pci, index=vf.index,
                               error=str(e))
        if rebinds:
            self.result.strategy[pf.pci] += f" (+{rebinds} rebinds)"

    def finish_vf(self, vf: VfSnapshot) -> None:
        """On a pool worker: MTU and admin state on the VF's netdev, name resolved now."""
        self.retrying(f"set the link of {vf.pci}", self.restore_link, vf, None)


def restore(node: Node, snapshot: Snapshot, *, deadline_s: float, workers: int,
            stop: threading.Event, log: Any) -> RestoreResult:
    return Restorer(node, snapshot, deadline_s=deadline_s, workers=workers, stop=stop,
                    log=log).run()
