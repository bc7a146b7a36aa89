"""`mofed-lifecycle peermem`: load nvidia-peermem exactly when the NIC driver is really ready.

One loop: read the node, decide (`checks.evaluate`), act, wait. Waits are inotify on the files that
change (the NIC marker, the blacklist, the GPU marker, the .ko and Module.symvers), bounded by a
backoff re-check for what inotify cannot see (/sys/module, /proc/kallsyms) and by the optional
overall deadline. A failed load is classified, reported once, and retried only when something it
depended on changed (`checks.fingerprint`); nothing here exits to crash-loop: only `--once` after a
load, the deadline (exit 1, naming what was missing) or SIGTERM end it.

Default mode keeps watching: the marker vanishes (a NIC reload is coming) -> unload nvidia_peermem
if unused; a *newer* marker appears -> load it again. A watching loader holds the presence lock the
lifecycle looks for (`presence.py`).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace
from typing import Any

from ..config import Config
from ..host.commands import CommandTimeout
from ..host.inotify import FileWatcher
from ..host.node import Tools
from ..log import get_logger
from ..metrics import PeermemMetrics, peermem_textfile
from ..signals import StopSignals
from . import gather
from .checks import (
    MODPROBE_NAME,
    MODULE,
    Facts,
    Kind,
    Marker,
    Verdict,
    classify_failure,
    evaluate,
    evaluate_stack,
    fingerprint,
)
from .presence import LoaderPresence, presence_path

EXIT_OK, EXIT_FAILED = 0, 1
FIRST_PAUSE_S = 0.1


class GaveUp(TimeoutError):
    """The overall deadline passed before nvidia-peermem could be loaded."""


class PeermemLoader:
    def __init__(self, node: Tools, config: Config, *, once: bool = False,
                 timeout_s: float | None = None, wait_gpu: bool = False) -> None:
        self.node, self.config, self.once, self.timeout_s = node, config, once, timeout_s
        self.wait_gpu = wait_gpu
        self.log = get_logger("peermem")
        p = node.paths
        self.marker_path = p.resolve(config.driver_ready_path)
        self.blacklist_path = p.resolve(config.blacklist_file)
        files = [self.marker_path, self.blacklist_path]
        if wait_gpu:
            files.append(p.resolve(config.gpu_driver_ready_path))
        self.watcher = FileWatcher(files)
        self.ko = gather.KoReader(p, node.commands)
        self.stop = threading.Event()
        self.presence = LoaderPresence(presence_path(p, config))
        metrics = (peermem_textfile(p.resolve(config.metrics_textfile))
                   if config.metrics_textfile else None)
        self.metrics = PeermemMetrics(metrics)
        self.loaded_against: tuple[int, int] | None = None  # the marker of our last load/verify
        self.failed: tuple[tuple[object, ...], Verdict] | None = None  # last failed load attempt
        self.reported: tuple[str, str] | None = None
        self.status = "waiting"  # the last verdict reported, in the contract's words
        self.pause = FIRST_PAUSE_S
        self.marker_seen_at: float | None = None

    # ---- the loop -------------------------------------------------------------------------------
    def request_stop(self, signum: int, _frame: object = None) -> None:
        self.log.info("signal.received", signal=signal.Signals(signum).name, next="stopping")
        self.stop.set()
        self.watcher.wake()

    def run(self) -> int:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        watching = not self.once and self.presence.acquire()
        self.log.info("peermem.started", marker=str(self.config.driver_ready_path),
                      once=self.once, timeout_s=self.timeout_s, wait_gpu=self.wait_gpu,
                      presence_lock=str(self.presence.path) if watching else None,
                      module_params=list(self.config.peermem_module_params))
        self.watcher.arm()
        try:
            while not self.stop.is_set():
                verdict = self.step()
                self.report(verdict)
                if verdict.ok and self.once:
                    return EXIT_OK
                if self.stop.is_set():
                    break
                wait = self.next_wait(verdict)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.give_up(verdict)
                    wait = left if wait is None else min(wait, left)
                if self.watcher.wait(wait):
                    self.pause = FIRST_PAUSE_S  # something changed: re-check promptly again
            self.log.info("peermem.stopped", status=self.status)
            return EXIT_OK
        finally:
            self.presence.release()
            self.watcher.close()

    def give_up(self, verdict: Verdict) -> None:
        msg = (f"nvidia-peermem not loaded after {self.timeout_s:g}s: {verdict.reason}"
               + (f"; {verdict.next}" if verdict.next else ""))
        self.log.error("peermem.gave_up", timeout_s=self.timeout_s, status=verdict.status,
                       code=verdict.code, missing=verdict.reason, next=verdict.next)
        raise GaveUp(msg)

    def next_wait(self, v: Verdict) -> float | None:
        """How long to wait for an inotify event before re-checking anyway (None: only events)."""
        cap = self.config.peermem_recheck_s
        if v.code == "changed":
            return 0.0
        if v.ok or v.kind is Kind.REBUILD:
            return cap  # keep verifying: a module can vanish without any file changing
        if v.code == "marker-absent" and not gather.peermem_state(self.node.paths).loaded:
            return None  # nothing to do until the marker comes back
        pause, self.pause = self.pause, min(self.pause * 2, cap)
        return min(pause, cap)

    def report(self, v: Verdict) -> None:
        """Log a verdict once (until it changes); a rebuild-needed one loudly."""
        key = ("ok", "") if v.ok else (v.kind.value, v.code if v.kind is not Kind.WAIT
                                       else v.reason)
        if key == self.reported or v.kind is Kind.LOAD or v.code == "changed":
            return
        self.reported = key
        self.status = v.status
        self.metrics.loaded.set(1 if v.ok else 0)
        self.metrics.write()
        fields: dict[str, Any] = {"status": v.status, "code": v.code, "reason": v.reason}
        if v.next:
            fields["next"] = v.next
        if v.kind is Kind.REBUILD:
            self.log.error("peermem.rebuild_needed", **fields)
        elif v.kind is Kind.ERROR:
            self.log.error("peermem.load_error", **fields)
        elif v.kind is Kind.WAIT:
            self.log.info("peermem.waiting", **fields)
        else:
            self.log.info(f"peermem.{v.kind.value}", **fields)

    # ---- one evaluation -------------------------------------------------------------------------
    def step(self) -> Verdict:
        paths = self.node.paths
        marker = gather.read_marker(self.marker_path)
        state = gather.peermem_state(paths)
        if marker is None:
            self.marker_seen_at = None
            self.ko.read()  # prefetch while waiting: the .ko checks then cost nothing later
            self._watch_ko()
            if state.loaded:
                return self.unload(state.refcnt)
        elif self.marker_seen_at is None:
            self.marker_seen_at = time.monotonic()
        facts = self.read_stack(marker, state.loaded)
        early = evaluate(facts) if state.loaded else evaluate_stack(facts)
        if early is not None and early.kind is not Kind.LOAD:
            if early.ok:
                self.loaded_against = marker.key if marker else None
            return early
        started = time.monotonic()
        facts = replace(facts, ko=self.ko.read(), **self.read_symvers(facts.kernel_release))
        self._watch_ko()
        left = self.config.peermem_debounce_s - (time.monotonic() - started)
        if left > 0 and self.watcher.wait(left):  # a file changed within the debounce: start over
            return Verdict(Kind.WAIT, "changed", "a watched file changed within the debounce")
        facts = replace(facts, srcversions_later=gather.stack_srcversions(paths),
                        exporters=gather.exporters(paths))
        verdict = evaluate(facts)
        if verdict.kind is not Kind.LOAD:
            return verdict
        return self.load(facts, marker)

    def read_stack(self, marker: Marker | None, loaded: bool) -> Facts:
        paths = self.node.paths
        gpu_marker, nvidia = gather.gpu_ready(paths, self.config) if self.wait_gpu else (True, True)
        return Facts(
            marker=marker, loaded_against=self.loaded_against,
            blacklist=(str(self.config.blacklist_file) if self.blacklist_path.exists() else None),
            srcversions=gather.stack_srcversions(paths), exporters=gather.exporters(paths),
            peermem_loaded=loaded, kernel_release=gather.kernel_release(paths),
            gpu_required=self.wait_gpu, gpu_marker=gpu_marker, nvidia_loaded=nvidia)

    def read_symvers(self, kernel: str) -> dict[str, Any]:
        crcs, path = gather.symvers(self.node.paths, self.config, kernel)
        if path is not None:
            self.watcher.watch(self.node.paths.resolve(path))
        return {"symvers": crcs, "symvers_path": path}

    def _watch_ko(self) -> None:
        if self.ko.local_path is not None:
            self.watcher.watch(self.ko.local_path)  # a new build wakes us up

    # ---- actions --------------------------------------------------------------------------------
    def load(self, facts: Facts, marker: Marker | None) -> Verdict:
        fp = fingerprint(facts)
        if self.failed is not None and self.failed[0] == fp and self.failed[1].definitive:
            return self.failed[1]  # nothing it depended on changed: retrying cannot help
        argv = ["modprobe", MODPROBE_NAME, *self.config.peermem_module_params]
        timeout = self.config.peermem_modprobe_timeout_s
        try:
            r = self.node.commands.run(argv, timeout_s=timeout, what="load nvidia-peermem")
            failure = None if r.ok else classify_failure(r.returncode, r.stderr)
        except CommandTimeout:
            failure = classify_failure(None, "", timed_out=True, timeout_s=timeout)
        except OSError as e:
            failure = Verdict(Kind.ERROR, "modprobe-missing", f"modprobe could not be started: "
                              f"{e}", "is kmod installed and on PATH?")
        if failure is None and not gather.peermem_state(self.node.paths).loaded:
            failure = Verdict(Kind.ERROR, "not-live", "modprobe exited 0 but nvidia_peermem is "
                              "not in /sys/module", "see dmesg")
        if failure is not None:
            self.failed = (fp, failure)
            self.metrics.failures.labels(failure.code).inc()
            self.log.warning("peermem.load_failed", code=failure.code, kind=str(failure.kind),
                             reason=failure.reason,
                             retry="only once the marker, the stack or the .ko changes"
                             if failure.definitive else "with a backoff")
            return failure
        self.failed = None
        self.loaded_against = marker.key if marker else None
        self.metrics.loads.inc()
        since = (round(time.monotonic() - self.marker_seen_at, 4)
                 if self.marker_seen_at is not None else None)
        return Verdict(Kind.LOADED, "loaded", f"nvidia-peermem loaded (peer-memory API from "
                       f"{facts.exporters.get('ib_register_peer_memory_client')}, marker seen "
                       f"{since}s before, module parameters "
                       f"{list(self.config.peermem_module_params)})")

    def unload(self, refcnt: int) -> Verdict:
        """The marker vanished while nvidia_peermem is loaded: a NIC reload is coming."""
        if refcnt > 0:
            return Verdict(Kind.WAIT, "in-use", f"the NIC readiness marker vanished but "
                           f"nvidia_peermem is in use (refcnt {refcnt}): not unloaded, so a NIC "
                           "driver reload will be refused until its users stop",
                           "stop the GPUDirect RDMA workloads (drain the node's GPU pods)")
        # rmmod, not `modprobe -r`: that would also try to remove what it used (nvidia, ib_core...)
        argv = ["rmmod", MODULE]
        try:
            r = self.node.commands.run(argv, timeout_s=self.config.peermem_modprobe_timeout_s,
                                           what="unload nvidia_peermem")
            ok, err = r.ok, " ".join(r.stderr.split())
        except OSError as e:
            ok, err = False, str(e)
        if ok:
            self.log.info("peermem.unloaded", why="the NIC readiness marker vanished: a NIC "
                          "driver reload may follow", next="loaded again once a newer marker "
                          "appears")
            self.metrics.loaded.set(0)
            self.metrics.write()
            return Verdict(Kind.WAIT, "marker-absent", "the NIC driver's readiness marker is "
                           "absent (nvidia_peermem unloaded)")
        return Verdict(Kind.WAIT, "unload-failed", f"the NIC readiness marker vanished; "
                       f"rmmod nvidia_peermem failed: {err}", "retried with a backoff")


def install_signal_handlers(loader: PeermemLoader) -> StopSignals:
    """The handler only records the signal; `request_stop` runs on a thread (signals.py)."""
    return StopSignals(loader.request_stop).install()


def run_loader(node: Tools, config: Config, *, once: bool, timeout_s: float | None,
               wait_gpu: bool) -> int:
    loader = PeermemLoader(node, config, once=once, timeout_s=timeout_s, wait_gpu=wait_gpu)
    signals = install_signal_handlers(loader)
    try:
        return loader.run()
    finally:
        signals.uninstall()


__all__ = ["GaveUp", "PeermemLoader", "Tools", "run_loader"]
