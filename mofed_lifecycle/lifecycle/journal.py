"""The lifecycle's memory across restarts: current state, history and facts, persisted atomically.

It lives under the drivers mount (`/run/mellanox/drivers/mofed-lifecycle/`), which survives a
container restart, so a run killed at any point is resumed by the next one: the journal tells it
what the previous run had done (blacklist written, driver swapped by us) that the node alone cannot.
`status.json` beside it is the one-screen summary for operators and probes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, Unpack, cast

from ..config import Config
from ..host.files import SpaceReserve, atomic_write_json, read_record_with_copy
from ..host.paths import NodePaths
from ..log import get_logger
from .machine import SWAP_STATES, State, is_ready

HISTORY_LIMIT = 500  # entries kept (oldest dropped): a journal never grows without bound
JOURNAL_DIR = "mofed-lifecycle"
# room kept on the drivers mount for the journal: deleted when the mount is full, so that the
# writes of a swap under way still land (a few dozen journals' worth)
RESERVE_FILE, RESERVE_BYTES = "journal.reserve", 1 << 20


def journal_dir(paths: NodePaths, config: Config) -> Path:
    """Where the journal, status.json and the SR-IOV snapshot live: under the drivers mount."""
    return paths.resolve(config.drivers_mount) / JOURNAL_DIR


JOURNAL_VERSION = 1  # on disk as "version"; a journal without one is version 1 (older daemons)


class Facts(TypedDict, total=False):
    """What the journal remembers across runs, every key typed (mypy checks each read and write).
    On disk as the journal's "facts"; a key absent means "never recorded"."""

    # the decision and the preflight of the last cycle
    decision: dict[str, Any]
    decision_text: str
    preflight: dict[str, Any]
    reason: str | None  # why the reload is refused (None: it is not)
    last_error: str | None  # the last failed step, and what the node was left with
    # the swap
    blacklist_written: bool  # committed before the host blacklist is written
    reloaded_by_us: bool  # the loaded driver is the one our reload loaded (inbox restore on stop)
    reloaded_this_run: bool
    unloaded_for_swap: list[str]  # holders and aux modules owed back
    stack_owed: list[str]  # stack modules owed back while openibd has not completed
    not_reloaded: list[str]  # owed modules that could not be loaded back
    # the SR-IOV restore
    restore_pending: bool  # a saved snapshot's VFs are owed
    restored_vfs: list[str]  # PCI addresses restored from it already
    snapshot: dict[str, Any]  # its summary (pfs, vfs, taken_at)
    restore: dict[str, Any] | None  # this run's restore summary
    # `run sources`: how the driver got here (mode, cache_hit, builds, kernel, fingerprint...)
    provision: dict[str, Any]
    doctor: list[dict[str, Any]]  # the findings of the last check (start, before a reload)
    uplink: dict[str, Any] | None  # UPLINK_POLICY=restore: the uplink saved before the reload


def valid_journal(doc: Any) -> bool | str:
    """True for a journal this daemon can resume from; else why not."""
    if not (isinstance(doc, dict) and isinstance(doc.get("facts", {}), dict)
            and isinstance(doc.get("history", []), list)
            and isinstance(doc.get("state") or "", str)):
        return False
    version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > JOURNAL_VERSION:
        return (f"journal version {version!r} was written by a newer mofed-lifecycle; this one "
                f"reads version {JOURNAL_VERSION}: run the newer one, or move the journal away")
    return True


class Journal:
    """Append-only history plus facts; every change is written before the step it announces."""

    def __init__(self, directory: Path, clock: Any = time.time,
                 on_unsaved: Callable[[str | None], None] | None = None) -> None:
        self.dir = directory
        # set while the last write failed (a full or read-only drivers mount): the daemon goes on
        # with what it holds in memory, so that a swap under way is finished and unwound (the host
        # blacklist removed, the VFs restored), and reports it; cleared by the next good write
        self.unsaved: str | None = None
        self.on_unsaved = on_unsaved
        self.path = directory / "journal.json"
        self.status_path = directory / "status.json"
        self.clock = clock
        self.copy_path = directory / "journal.copy.json"  # the same record, written after it
        self.reserve = SpaceReserve(directory / RESERVE_FILE, RESERVE_BYTES)
        self.log = get_logger("journal")
        self.spare_failed = False
        # the mount filled up this run, or has no room for the reserve: no new swap is started
        self.no_reserve = False
        previous, self.damaged, self.used = read_record_with_copy(
            self.path, self.copy_path, valid_journal)
        self.previous: dict[str, Any] = previous if isinstance(previous, dict) else {}
        # neither file reads (damaged, or from a newer daemon): they are left exactly as they are
        # (a later start must find them refused again, never a fresh journal written over them);
        # only status.json says what this run does
        self.frozen = bool(self.damaged) and self.used is None
        self.history: list[dict[str, Any]] = list(self.previous.get("history", []))[-HISTORY_LIMIT:]
        # as read from disk: a key of another type is the reader's to doubt (status, probes)
        self.facts: Facts = cast(Facts, dict(self.previous.get("facts", {})))
        self.state: State | None = None
        self.since = self.clock()
        self.run_started = self.since

    # ---- what the previous run left ------------------------------------------------------------
    def previous_state(self) -> State | None:
        try:
            return State(self.previous.get("state", ""))
        except ValueError:
            return None

    def previous_died_mid_swap(self) -> bool:
        """The previous run stopped (killed) while the driver was being swapped."""
        return self.previous_state() in SWAP_STATES

    # ---- this run ------------------------------------------------------------------------------
    def start_run(self, **detail: Any) -> None:
        with contextlib.suppress(OSError):  # a read-only mount: the writes below say so
            self.dir.mkdir(parents=True, exist_ok=True)
        if not self.reserve.ensure():
            self.no_reserve = True
            self.log.warning("journal.no_reserve", path=str(self.reserve.path),
                             bytes=RESERVE_BYTES, why="no room on the drivers mount to keep it",
                             next="free space there; until then no driver swap is started (one "
                                  "could not be finished durably)")
        self.run_started = self.clock()
        self.history.append({"run": os.getpid(), "at": round(self.run_started, 6), **detail})
        self.write()

    def enter(self, state: State, **detail: Any) -> None:
        self.state, self.since = state, self.clock()
        self.history.append({"state": str(state), "at": round(self.since, 6), **detail})
        del self.history[:-HISTORY_LIMIT]
        self.write()

    def set(self, **facts: Unpack[Facts]) -> None:
        self.facts.update(facts)
        self.write()

    def commit(self, **facts: Unpack[Facts]) -> bool:
        """Set `facts` only if they reach the disk: False (and memory as it was) if the write
        failed. For facts that must be durable before the node is touched."""
        before = self.facts.copy()
        self.set(**facts)
        if self.unsaved is None:
            return True
        self.facts = before
        return False

    def write(self) -> None:
        doc = {"version": JOURNAL_VERSION, "pid": os.getpid(),
               "state": str(self.state) if self.state else None,
               "since": round(self.since, 6), "facts": self.facts, "history": self.history}
        if self.frozen:
            with contextlib.suppress(OSError):
                atomic_write_json(self.status_path, self._status(doc))
            return
        try:
            self._write_primary(doc)
        except OSError as e:
            first = self.unsaved is None
            self.unsaved = f"{e.filename or self.path}: {e.strerror or e}"
            if first and self.on_unsaved is not None:
                self.on_unsaved(self.unsaved)
            return
        if self.unsaved is not None and self.on_unsaved is not None:
            self.unsaved = None
            self.on_unsaved(None)  # saved again: memory and disk agree
        self.unsaved = None
        try:  # the spare and the summary: best effort (the journal itself is on disk)
            atomic_write_json(self.copy_path, doc)  # a damaged journal.json is not the end
            atomic_write_json(self.status_path, self._status(doc))
        except OSError as e:
            if not self.spare_failed:
                self.log.warning("journal.spare_unsaved", error=str(e),
                                 why="journal.json is saved; its copy or status.json is not")
            self.spare_failed = True
        else:
            self.spare_failed = False

    def _write_primary(self, doc: dict[str, Any]) -> None:
        try:
            atomic_write_json(self.path, doc)
        except OSError as e:
            if e.errno != errno.ENOSPC or not self.reserve.release():
                raise
            self.no_reserve = True
            self.log.error("journal.reserve_released", path=str(self.reserve.path),
                           bytes=RESERVE_BYTES, mount=str(self.dir.parent),
                           why="the drivers mount is full (No space left on device)",
                           next=f"free space on {self.dir.parent}: the journal goes on in the "
                                "room kept for it, and a new reserve is kept at the next start")
            atomic_write_json(self.path, doc)

    def _status(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {
            "state": doc["state"], "since": doc["since"], "pid": doc["pid"],
            "ready": is_ready(self.state),
            "reason": self.facts.get("reason"), "last_error": self.facts.get("last_error"),
            "decision": self.facts.get("decision_text"),
            "reloaded_by_us": self.facts.get("reloaded_by_us", False),
        }

