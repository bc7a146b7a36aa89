"""The lifecycle's memory across restarts: current state, history and facts, persisted atomically.

It lives under the drivers mount (`/run/mellanox/drivers/mofed-lifecycle/`), which survives a
container restart, so a run killed at any point is resumed by the next one: the journal tells it
what the previous run had done (blacklist written, driver swapped by us) that the node alone cannot.
`status.json` beside it is the one-screen summary for operators and probes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..host.files import atomic_write_json, read_record_with_copy
from ..host.paths import NodePaths
from .machine import SWAP_STATES, State

HISTORY_LIMIT = 500  # entries kept (oldest dropped): a journal never grows without bound
JOURNAL_DIR = "mofed-lifecycle"


def journal_dir(paths: NodePaths, config: Config) -> Path:
    """Where the journal, status.json and the SR-IOV snapshot live: under the drivers mount."""
    return paths.resolve(config.drivers_mount) / JOURNAL_DIR


def valid_journal(doc: Any) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("facts", {}), dict)
            and isinstance(doc.get("history", []), list)
            and isinstance(doc.get("state") or "", str))


class Journal:
    """Append-only history plus facts; every change is written before the step it announces."""

    def __init__(self, directory: Path, clock: Any = time.time) -> None:
        self.dir = directory
        self.path = directory / "journal.json"
        self.status_path = directory / "status.json"
        self.clock = clock
        self.copy_path = directory / "journal.copy.json"  # the same record, written after it
        previous, self.damaged, self.used = read_record_with_copy(
            self.path, self.copy_path, valid_journal)
        self.previous: dict[str, Any] = previous if isinstance(previous, dict) else {}
        self.history: list[dict[str, Any]] = list(self.previous.get("history", []))[-HISTORY_LIMIT:]
        self.facts: dict[str, Any] = dict(self.previous.get("facts", {}))
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
        self.run_started = self.clock()
        self.history.append({"run": os.getpid(), "at": round(self.run_started, 6), **detail})
        self.write()

    def enter(self, state: State, **detail: Any) -> None:
        self.state, self.since = state, self.clock()
        self.history.append({"state": str(state), "at": round(self.since, 6), **detail})
        del self.history[:-HISTORY_LIMIT]
        self.write()

    def set(self, **facts: Any) -> None:
        self.facts.update(facts)
        self.write()

    def write(self) -> None:
        doc = {"pid": os.getpid(), "state": str(self.state) if self.state else None,
               "since": round(self.since, 6), "facts": self.facts, "history": self.history}
        atomic_write_json(self.path, doc)
        atomic_write_json(self.copy_path, doc)  # a spare: a damaged journal.json is not the end
        atomic_write_json(self.status_path, {
            "state": doc["state"], "since": doc["since"], "pid": doc["pid"],
            "ready": self.state in (State.READY, State.SERVE),
            "reason": self.facts.get("reason"), "last_error": self.facts.get("last_error"),
            "decision": self.facts.get("decision_text"),
            "reloaded_by_us": self.facts.get("reloaded_by_us", False),
        })

