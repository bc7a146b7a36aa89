"""`mofed-lifecycle probe startup|ready|live`: Kubernetes exec probes that check what matters.

Each returns pass/fail and one line saying why (exit 0 / 1). Read-only and fast (no lock, a few
files, one `modinfo` per module), so a probe's timeoutSeconds of 10 is ample.

- ready: the readiness marker is the daemon's valid JSON; for every compared module the loaded
  srcversion (`/sys/module/<m>/srcversion`) equals the marker's AND the installed one (`modinfo -F
  srcversion`); the daemon is serving and the VF restore finished (journal `restore_pending` false,
  or a partial restore the daemon was told to accept with READY_ON_PARTIAL_RESTORE=true).
  `lsmod | grep mlx5_core` passes on the inbox driver; this does not.
- live: the daemon's heartbeat is fresh (younger than `--max-age`, default 3 heartbeat intervals),
  it has not exited, and its current step is not past its budget (a hung step). A daemon that holds
  the run lock but has not beaten yet (the heartbeat absent, or a predecessor's) is "starting".
- startup: the marker is set, or the daemon is up and progressing (live passes). Once it passes,
  kubelet hands over to the liveness and readiness probes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .config import Config
from .heartbeat import read_heartbeat
from .host.files import InstanceLock, read_json
from .host.node import Tools
from .host.paths import NodePaths
from .lifecycle.decide import ModuleComparison
from .lifecycle.journal import journal_dir
from .lifecycle.machine import is_ready
from .status import driver_srcversions, module_list, read_marker


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str

    def line(self, which: str) -> str:
        return f"{which}: {'pass' if self.ok else 'FAIL'}: {self.message}"


def probe_ready(tools: Tools, config: Config) -> ProbeResult:
    paths = tools.paths
    marker_path = paths.resolve(config.driver_ready_path)
    marker, why = read_marker(marker_path)
    journal = read_json(journal_dir(paths, config) / "journal.json")
    journal = journal if isinstance(journal, dict) else {}
    state = journal.get("state")
    if marker is None:
        return ProbeResult(False, f"readiness marker {marker_path} {why}"
                                  + (f" (daemon state: {state})" if state else ""))
    mods = driver_srcversions(tools, module_list(config, marker))
    recorded = marker["srcversions"]
    for m, v in mods.items():
        if not v["loaded"]:
            return ProbeResult(False, f"{m} is not loaded")
        if recorded.get(m) != v["loaded"]:
            return ProbeResult(False, f"{m} srcversion {v['loaded']} loaded ≠ {recorded.get(m)} "
                                      "in the marker: the driver changed after it was set")
        if ModuleComparison(m, v["loaded"], v["installed"], core=True).differs:
            return ProbeResult(False, f"{m} srcversion {v['loaded']} loaded ≠ "
                                      f"{v['installed'] or 'none'} installed (modinfo): the "
                                      "installed driver is not the one loaded")
    if state is not None and not is_ready(state):
        return ProbeResult(False, f"the daemon is in state {state}, not serving")
    facts = journal.get("facts") or {}
    restore: dict[str, Any] = facts["restore"] if isinstance(facts.get("restore"), dict) else {}
    failed = sorted(restore.get("failed") or {})
    vfs = ""
    if facts.get("restore_pending"):
        if not (failed and config.ready_on_partial_restore):
            return ProbeResult(False, "the VF restore has not finished (journal: "
                                      "restore_pending)")
        vfs = f"; {len(failed)} VF(s) not restored, accepted by READY_ON_PARTIAL_RESTORE=true: " \
              + ", ".join(failed)
    elif restore:
        vfs = f"; {restore.get('restored', 0)} VF(s) restored"
    names = ", ".join(mods)
    return ProbeResult(True, f"driver {marker.get('driver_version')} loaded = installed = marker "
                             f"({names}){vfs}")


def probe_live(root: Path, config: Config, max_age_s: float | None = None,
               now: float | None = None) -> ProbeResult:
    paths = NodePaths.at(root)
    jdir = journal_dir(paths, config)
    beat = read_heartbeat(jdir)
    if beat is None or not isinstance(beat.get("at"), int | float):
        starting = _starting(paths, config, None)
        return starting or ProbeResult(False, f"no heartbeat in {jdir}: the daemon has not "
                                              "started")
    now = time.time() if now is None else now
    interval = float(beat.get("interval_s") or config.heartbeat_interval_s)
    limit = max_age_s if max_age_s is not None else 3 * interval
    age = now - beat["at"]
    state = beat.get("state")
    if not beat.get("running", True) or age > limit:  # a predecessor's: a new one may be starting
        starting = _starting(paths, config, beat.get("pid"))
        if starting is not None:
            return starting
    if not beat.get("running", True):
        return ProbeResult(False, f"the daemon exited (last state {state}, {age:.0f}s ago)")
    if age > limit:
        return ProbeResult(False, f"heartbeat stale: last beat {age:.1f}s ago (max {limit:g}s) "
                                  f"in state {state}: the daemon is hung or gone")
    in_state = now - float(beat.get("state_since") or now)
    if beat.get("overdue"):
        return ProbeResult(False, f"state {state} for {in_state:.0f}s, past its budget of "
                                  f"{beat.get('state_budget_s'):g}s: the step looks hung")
    return ProbeResult(True, f"heartbeat {age:.1f}s ago; state {state} for {in_state:.1f}s")


def fresh_lock_holder(paths: NodePaths, config: Config, within_s: float) -> int | None:
    """The PID of the live `mofed-lifecycle` process that took the run lock less than `within_s`
    ago (the lock file is rewritten when it is taken), if any. Read from the lock file, never by
    taking the lock: a probe must not make a starting daemon fail."""
    lock = InstanceLock(paths.resolve(config.lock_file_path))
    try:
        if time.time() - lock.path.stat().st_mtime > within_s:
            return None
        pid = lock.holder_pid()
        cmdline = " ".join(psutil.Process(pid).cmdline()) if pid else ""
    except (OSError, psutil.Error):
        return None
    return pid if "mofed-lifecycle" in cmdline or "mofed_lifecycle" in cmdline else None


def _starting(paths: NodePaths, config: Config, beat_pid: object) -> ProbeResult | None:
    """A daemon that took the lock moments ago but has not beaten yet (the heartbeat is absent
    or a predecessor's): alive, starting. Its first beat follows the lock at once, so "starting"
    lasts at most 3 heartbeat intervals."""
    pid = fresh_lock_holder(paths, config, 3 * config.heartbeat_interval_s)
    if pid is None or pid == beat_pid:
        return None
    return ProbeResult(True, f"the daemon (pid {pid}) is starting: it holds the lock, its first "
                             "heartbeat is due")


def probe_startup(root: Path, config: Config, max_age_s: float | None = None) -> ProbeResult:
    paths = NodePaths.at(root)
    marker_path = paths.resolve(config.driver_ready_path)
    marker, _why = read_marker(marker_path)
    if marker is not None:
        return ProbeResult(True, f"readiness marker set ({marker.get('time')})")
    live = probe_live(root, config, max_age_s)
    if live.ok:
        return ProbeResult(True, f"progressing: {live.message}")
    return ProbeResult(False, live.message)


def run_probe(which: str, tools: Tools, config: Config, max_age_s: float | None = None) -> \
        ProbeResult:
    if which == "ready":
        return probe_ready(tools, config)
    if which == "live":
        return probe_live(tools.paths.root, config, max_age_s)
    return probe_startup(tools.paths.root, config, max_age_s)
