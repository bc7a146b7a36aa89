"""Drives the state machine on a node: performs each state's step, journals every transition.

`Runner.run()` is `mofed-lifecycle run`: take the lock, clean up what a killed predecessor left (its
blacklist, the marker), then walk the states from `machine.TRANSITIONS`. Every run starts from the
node as it is and the journal of the previous run, so a restart after SIGKILL at any point resumes:
a node left without a driver is reloaded, a blacklist left on the host is removed.

Signals: SIGTERM/SIGINT set a stop request, honoured at the next state boundary outside the critical
section (see machine.py); waits (serve, re-check) wake at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..config_paths import check_written_paths
from ..host.commands import CommandTimeout
from ..host.files import InstanceLock, LockHeld, remove_file
from ..host.headers_mount import HeadersMount
from ..host.modules import ModuleCommandError, loaded_srcversions, read_module_facts
from ..host.node import Node
from ..host.udev_rules import install_rule, remove_stale_rule
from ..log import Transitions, get_logger
from ..provision.plan import BuildSpec, Mode
from ..signals import StopSignals
from .blacklist import remove_blacklist
from .decide import Decision
from .errors import StepFailed
from .journal import Journal, journal_dir
from .machine import CRITICAL, Outcome, State, next_state
from .preflight import Preflight
from .steps import STEPS, restore_inbox_driver
from .telemetry import Telemetry
from .uplink import startup_uplink

EXIT_OK, EXIT_FAILED = 0, 1
CRASH_AT_ENV = "MOFED_LIFECYCLE_CRASH_AT"  # fault injection for tests: SIGKILL self on entering


class Crashed(BaseException):
    """The in-process stand-in for SIGKILL at CRASH_AT (a test driving `main()` in its own
    process): the run stops where it is; nothing more is written, only the lock is let go (as
    the kernel lets a dead process's lock go)."""


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Runner:
    """The lifecycle on one node: the loop over `machine.next_state`, each state's step from
    `steps.STEPS`, the journal, the lock and signals."""

    def __init__(self, node: Node, config: Config, *, once: bool = False,
                 die: Callable[[], None] = sigkill_self, mode: Mode = Mode.PRECOMPILED) -> None:
        self.node, self.config, self.once, self.die = node, config, once, die
        self.mode = mode
        self.provisioned: BuildSpec | None = None  # installed by this process (sources mode)
        self.headers = HeadersMount(node.paths, node.commands, drivers_mount=config.drivers_mount,
                                    source=config.shared_kernel_headers_dir,
                                    timeout_s=config.tool_timeout_s)
        self.headers_mounted = False  # by this process (one found at start is stale)
        self.failed_in: State | None = None  # the state whose step failed last
        self.doctor_said: set[str] = set()  # findings logged already (once each)
        self.doctor_ran = False
        self.firmware_facts: dict[str, Any] = {}  # mstconfig's answers, read once per start
        self.udev_rule = node.paths.resolve(config.udev_rules_file)
        self.log = get_logger("lifecycle")
        self.pid = os.getpid()
        p = node.paths
        self.marker_path = p.resolve(config.driver_ready_path)
        self.blacklist_path = p.resolve(config.blacklist_file)
        self.lock = InstanceLock(p.resolve(config.lock_file_path))
        self.journal = Journal(journal_dir(p, config), on_unsaved=self.journal_unsaved)
        self.stop = threading.Event()
        self.transitions = Transitions(self.log)
        self.facts: dict[str, Any] = {}
        self.loaded: dict[str, str | None] = {}
        self.installed: dict[str, str | None] = {}
        self.decision: Decision | None = None
        self.preflight: Preflight | None = None
        self.crash_at = os.environ.get(CRASH_AT_ENV, "")
        self.swap_failed = False  # a step of the swap failed: unblacklist, then fail
        self.restore_waited: set[str] = set()  # PFs a VF restore waited for (their netdevs)
        self.record_damaged: str | None = None  # the journal and its copy are unreadable
        # sd_notify (STATUS=, READY=1, STOPPING=1, WATCHDOG=1), heartbeat.json, metrics
        self.telemetry = Telemetry(p, config, self.journal,
                                   lambda: (self.state_name, self.journal.since))

    # ---- waiting --------------------------------------------------------------------------------
    def sleep(self, seconds: float) -> None:
        """A wait that a stop request cuts short (tenacity's backoff uses it too)."""
        self.stop.wait(seconds)

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """A stop request, in normal context (never from inside a signal handler)."""
        self.log.info("signal.received", signal=signal.Signals(signum).name, state=self.state_name,
                      next="finishing the driver swap first" if self.in_critical() else "stopping")
        self.stop.set()
        self.telemetry.stop_requested(self.in_critical())

    @property
    def state_name(self) -> str:
        """The current state; "lock" until the first is entered (the heartbeat and a signal can
        come that early: the lock is what the process is taking or holds)."""
        return str(self.journal.state or State.LOCK)

    def journal_unsaved(self, error: str | None) -> None:
        if error is None:
            self.log.warning("journal.saved_again", path=str(self.journal.path))
            return
        self.log.error("journal.unsaved", error=error, state=self.state_name,
                       next="free space on the drivers mount (or make it writable); a swap under "
                            "way is finished and unwound from memory (blacklist removed, VFs "
                            "restored), no new one is started, and the node is not marked ready "
                            "until the journal is saved again")

    def require_saved(self, what: str, *, starting: bool = True) -> None:
        """A state a restart could not resume from is a failure; and no swap is started on a
        mount that filled up this run (its reserve is what finishes a swap under way)."""
        mount = self.journal.dir.parent
        if self.journal.unsaved:
            raise StepFailed(f"the journal cannot be written ({self.journal.unsaved}): {what}; "
                             f"free space on {mount}")
        if starting and self.journal.no_reserve:
            raise StepFailed(f"the drivers mount {mount} is full (no room is kept for the "
                             f"journal to finish a swap): {what}; free space on {mount}")

    def in_critical(self) -> bool:
        return self.journal.state in CRITICAL

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        check_written_paths(self.node.paths, self.config)  # a directory at the lock path: exit 2
        try:
            self.lock.acquire()
        except LockHeld as e:
            self.log.error("lock.held", path=str(self.lock.path), holder_pid=e.pid, error=str(e))
            return EXIT_FAILED
        except OSError as e:  # cannot even create the lock file (a full or read-only mount)
            self.log.error("lock.unavailable", path=str(self.lock.path), error=str(e),
                           next="free space on (or remount read-write) the lock file's mount; "
                                "nothing on the node was touched")
            return EXIT_FAILED
        crashed = False
        try:
            self.telemetry.start()  # the heartbeat beats while we hold the lock
            return self._run_locked()
        except Crashed:
            crashed = True
            raise
        finally:
            if crashed:
                self.telemetry.halt()  # a killed process writes no last heartbeat
            else:
                self.telemetry.close()
            self.lock.release()

    def _startup_cleanup(self) -> None:
        prev = self.journal.previous_state()
        damaged, used = self.journal.damaged, self.journal.used
        if damaged:  # loud, explicit: never "nothing to do"
            self.log.error("journal.damaged", damaged=damaged,
                           used=str(used) if used else None,
                           next=f"resumed from {used}" if used else
                           "neither journal.json nor its copy reads: the node's history is "
                           "unknown, the daemon stays not ready; check the node (status, `sim "
                           "state`/lsmod, ip link) and move the journal directory away to start "
                           "afresh")
            self.record_damaged = None if used else f"the journal is damaged: {damaged}"
        self.journal.start_run(previous_state=str(prev) if prev else None)
        if prev is not None:
            self.log.info("journal.resumed", previous_state=str(prev),
                          died_mid_swap=self.journal.previous_died_mid_swap(),
                          reloaded_by_us=bool(self.journal.facts.get("reloaded_by_us")))
        # The marker stays while nothing says the driver changed: a restart with nothing to reload
        # must not make a watching peermem loader unload nvidia_peermem. It goes as soon as a
        # reload is decided (decide), a step fails or a reload is refused, and on stop.
        if self.journal.previous_died_mid_swap():
            self.clear_marker("the previous run died mid-swap")
        done = remove_blacklist(self.blacklist_path, self.journal.dir)
        if done in ("removed", "restored"):
            self.log.warning("blacklist.stale_removed", path=str(self.blacklist_path),
                             why="a previous run died holding it", user_file_restored=done ==
                             "restored")
        elif done == "not ours":
            self.log.warning("blacklist.not_ours", path=str(self.blacklist_path),
                             why="a file without mofed-lifecycle's header is at the blacklist "
                                 "path: left alone (it is kept, with our lines added, during a "
                                 "reload)")
        if self.headers.mounted():  # a killed predecessor's: its content may be stale
            self.headers.unmount("stale: left by a previous run; made again before ready")
        if self.config.create_ifnames_udev:
            install_rule(self.node.paths, self.udev_rule)
        # `restore` is this run's summary (status shows this run's VF counts, not a past run's)
        self.journal.set(blacklist_written=False, last_error=None, reloaded_this_run=False,
                         restore=None)
        startup_uplink(self)  # a killed predecessor's reload took the uplink: back first

    def _run_locked(self) -> int:
        state = State.LOCK
        self.enter(state, pid=self.pid, path=str(self.lock.path))
        self._startup_cleanup()
        outcome: Outcome | None = Outcome.OK
        while True:
            assert outcome is not None  # None ends the loop below
            state = next_state(state, outcome, stop_requested=self.stop.is_set())
            if state is State.STOPPED:
                self.enter(state)
                failed = outcome is Outcome.FAILED and not self.stop.is_set()
                return EXIT_FAILED if failed else EXIT_OK
            self.enter(state)
            outcome = self.perform(state)
            if outcome is None:  # --once and the node is ready (or failed for good)
                return self.exit_code

    def enter(self, state: State, **detail: Any) -> None:
        self.journal.enter(state, **detail)
        self.transitions.enter(str(state), **detail)
        self.telemetry.entered(state)  # STATUS=; READY=1 on serve (marker set); STOPPING=1
        if self.crash_at == str(state):
            self.die()

    exit_code = EXIT_OK

    def perform(self, state: State) -> Outcome | None:
        if state is State.SERVE:
            return self.serve()
        if state in (State.REFUSED, State.FAILED):
            if self.failed_in is State.PROVISION and self.marker_still_true():
                self.log.info("marker.kept", path=str(self.marker_path),
                              why="the build failed before anything on the node was touched, "
                                  "and the loaded driver is still the one the marker names")
            else:
                self.clear_marker(f"{state}: not ready")
            return self.wait_to_retry(state)
        if state is State.STOPPING:
            self.clear_marker("stopping")
            restore_inbox_driver(self)
            self.headers.unmount("stopping: the host keeps no mount into this container")
            if self.config.create_ifnames_udev:
                remove_stale_rule(self.udev_rule)
            return Outcome.OK
        if state is State.PROVISION:  # a new cycle
            self.failed_in = None
            self.restore_waited = set()
        try:
            return STEPS[state](self)
        except (StepFailed, ModuleCommandError, CommandTimeout, OSError) as e:
            self.journal.set(last_error=f"{state}: {e}")
            self.failed_in = state
            self.swap_failed = self.swap_failed or state in CRITICAL
            retry = ("--once: exiting 1" if self.once else
                     f"retrying from provision in {self.config.recheck_interval_s:g}s")
            left = self.node_left(state)
            self.log.error("step.failed", state=str(state), error=str(e),
                           next=f"{left}; {retry}; fix the cause named in `error` (see the "
                                "command output logged above)")
            return Outcome.FAILED

    def marker_still_true(self) -> bool:
        """The marker's srcversions are the loaded ones now (a watching peermem loader keeps
        nvidia_peermem loaded while the marker stays)."""
        try:
            marker = json.loads(self.marker_path.read_text())
            named = dict(marker["srcversions"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        loaded = loaded_srcversions(self.node.paths, list(named))
        return bool(named) and all(loaded.get(m) == v for m, v in named.items())

    def clear_marker(self, why: str) -> None:
        if remove_file(self.marker_path):
            self.log.info("marker.cleared", path=str(self.marker_path), why=why)

    def node_left(self, state: State) -> str:
        """What a failure in `state` leaves on the node, said truthfully."""
        if state in CRITICAL:  # the swap goes on: modules loaded back, then the blacklist removed
            return "the swap is being unwound (modules unloaded for it are loaded back, the " \
                   "blacklist is removed, then the VFs are restored if the driver is loaded)"
        missing = list(self.journal.facts.get("not_reloaded") or [])
        try:  # still missing now? an operator may have loaded them since
            loaded = read_module_facts(self.node.paths)
            missing = [m for m in missing if m not in loaded]
        except OSError:  # /proc/modules unreadable: say what the journal says
            pass
        if missing:
            return ("the node is NOT consistent: these modules unloaded for the swap could not "
                    f"be loaded back: {', '.join(missing)} (load them by hand: modprobe NAME)")
        return "the node was left consistent (no blacklist, no module left unloaded)"

    def serve(self) -> Outcome | None:
        if self.once:
            self.exit_code = EXIT_OK
            return None
        self.log.info("serving", marker=str(self.marker_path), next="waiting for SIGTERM")
        self.stop.wait()
        return Outcome.STOP

    def wait_to_retry(self, state: State) -> Outcome | None:
        if self.once:
            self.exit_code = EXIT_FAILED
            if self.config.entrypoint_debug:
                self.log.info("debug.sleep_before_exit", seconds=self.config.debug_sleep_on_exit_s)
                self.sleep(self.config.debug_sleep_on_exit_s)
            return None
        self.log.info("recheck.scheduled", state=str(state), in_s=self.config.recheck_interval_s)
        if self.stop.wait(self.config.recheck_interval_s):
            return Outcome.STOP
        return Outcome.RETRY


def install_signal_handlers(runner: Runner) -> StopSignals:
    """The handler only records the signal; `request_stop` runs on a thread (signals.py)."""
    return StopSignals(runner.request_stop).install()


def run_lifecycle(node: Node, config: Config, *, once: bool,
                  die: Callable[[], None] = sigkill_self, mode: Mode = Mode.PRECOMPILED) -> int:
    runner = Runner(node, config, once=once, die=die, mode=mode)
    signals = install_signal_handlers(runner)
    started = time.monotonic()
    try:
        code = runner.run()
    finally:
        signals.uninstall()
    runner.log.info("exit", code=code, elapsed_s=round(time.monotonic() - started, 3))
    return code

