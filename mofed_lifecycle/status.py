"""`mofed-lifecycle status`: one screen for an operator on the node, gathered from what is there.

Read-only: the journal and status file (`MLX_DRIVERS_MOUNT/mofed-lifecycle/`), the heartbeat, the
readiness marker, the lock file, `/sys/module/<m>/srcversion` (loaded) and `modinfo -F srcversion`
(installed). It never takes the lock (a status must not make a starting daemon think a second
instance runs); the lock holder's PID is read from the lock file and checked for life.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil

from .config import Config
from .heartbeat import read_heartbeat
from .host.files import InstanceLock, read_json
from .host.modules import (
    ModuleCommandError,
    installed_srcversions,
    loaded_srcversions,
    read_module_facts,
)
from .host.node import Tools
from .lifecycle.budget import stop_budget_s
from .lifecycle.decide import CORE, ModuleComparison
from .lifecycle.journal import journal_dir

MODINFO_TIMEOUT_S = 5.0


def read_marker(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker document, None) or (None, why it is not usable)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, "absent"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    try:
        doc = json.loads(text)
    except ValueError:
        return None, "not valid JSON (not written by mofed-lifecycle, or torn)"
    if not isinstance(doc, dict) or not isinstance(doc.get("srcversions"), dict):
        return None, "JSON without srcversions (not written by mofed-lifecycle)"
    return doc, None


def module_list(config: Config, marker: dict[str, Any] | None) -> list[str]:
    extra = list((marker or {}).get("srcversions", {}))
    return list(dict.fromkeys([*CORE, *extra]))  # the core, and whatever the marker recorded


def driver_srcversions(tools: Tools, modules: list[str]) -> dict[str, dict[str, Any]]:
    """{module: {loaded, installed, present}}; installed is None when modinfo finds none (or
    fails); present: in /proc/modules at all (an unversioned build is present with no loaded
    srcversion)."""
    loaded = loaded_srcversions(tools.paths, modules)
    try:
        present = set(read_module_facts(tools.paths))
    except OSError:
        present = {m for m, v in loaded.items() if v}
    try:
        installed = installed_srcversions(modules, tools.commands, MODINFO_TIMEOUT_S)
    except ModuleCommandError:
        installed = {m: None for m in modules}
    return {m: {"loaded": loaded.get(m), "installed": installed.get(m), "present": m in present}
            for m in modules}


def lock_holder(path: Path) -> dict[str, Any]:
    """The PID written in the lock file, and whether a daemon runs: the lock is held (a PID
    alone may be a dead run's, reused since); where /proc/locks cannot be read, the PID lives."""
    lock = InstanceLock(path)
    pid = lock.holder_pid()
    held = lock.held()
    alive = pid is not None and pid > 0 and psutil.pid_exists(pid)
    return {"path": str(path), "pid": pid, "running": alive if held is None else held}


def last_transition(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    states = [h for h in history if "state" in h]
    if not states:
        return None
    prev = states[-2] if len(states) > 1 else None
    return {"from": prev["state"] if prev else None, "to": states[-1]["state"],
            "at": states[-1]["at"], "after_s": round(states[-1]["at"] - prev["at"], 3)
            if prev else None}


def gather(tools: Tools, config: Config, *, now: float | None = None) -> dict[str, Any]:
    """Everything `status` shows, as a JSON-able dict (`status --json` prints it)."""
    now = time.time() if now is None else now
    paths = tools.paths
    jdir = journal_dir(paths, config)
    journal = read_json(jdir / "journal.json")
    journal = journal if isinstance(journal, dict) else {}
    facts = journal.get("facts") or {}
    marker_path = paths.resolve(config.driver_ready_path)
    marker, marker_error = read_marker(marker_path)
    beat = read_heartbeat(jdir)
    restore = facts.get("restore") if isinstance(facts.get("restore"), dict) else None
    lock = lock_holder(paths.resolve(config.lock_file_path))
    return {
        "state": journal.get("state"),
        "running": lock["running"],
        "since": journal.get("since"),
        "in_state_s": round(now - journal["since"], 3) if journal.get("since") else None,
        "pid": journal.get("pid"),
        "last_transition": last_transition(journal.get("history") or []),
        "driver": {"version_configured": config.driver_version or None,
                   "version_marker": (marker or {}).get("driver_version"),
                   "modules": driver_srcversions(tools, module_list(config, marker))},
        "marker": {"path": str(marker_path), "set": marker is not None, "error": marker_error,
                   "time": (marker or {}).get("time"), "srcversions": (marker or {}).get(
                       "srcversions")},
        "vfs": {"restored": restore.get("restored") if restore else None,
                "failed": sorted(restore.get("failed") or {}) if restore else [],
                "strategy": restore.get("strategy") if restore else None,
                "restore_pending": bool(facts.get("restore_pending"))},
        "lock": lock,
        "heartbeat": {"age_s": round(now - beat["at"], 3), "running": beat.get("running"),
                      "overdue": beat.get("overdue")} if beat and "at" in beat else None,
        "reason": facts.get("reason"),
        "last_error": facts.get("last_error"),
        "decision": facts.get("decision_text"),
        # unloaded for a swap and not loaded back: still missing now (an operator may have since)
        "modules_not_reloaded": [m for m in facts.get("not_reloaded") or []
                                 if not paths.module(m).exists()],
        "stop_budget_s": stop_budget_s(config),
        "journal_dir": str(jdir),
        # `doctor`'s findings as the daemon's last check saw them (run `doctor` for now)
        "doctor": [{"id": f.get("id"), "severity": f.get("severity"), "subject": f.get("subject")}
                   for f in facts.get("doctor") or []],
    }


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def utc(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "?"


def format_status(st: dict[str, Any]) -> str:
    """The one screen: a line per topic, `-` where there is nothing to say."""
    lines = []
    if st["state"] is None:
        lines.append(f"state        never ran here (no journal in {st['journal_dir']})")
    else:
        exited = "" if st.get("running") or st["state"] == "stopped" else (
            " — the daemon is not running (it exited here: `run --once`, or killed)")
        lines.append(f"state        {st['state']} since {utc(st['since'])} "
                     f"({ago(st['in_state_s'])} ago), daemon PID {st['pid']}{exited}")
    t = st["last_transition"]
    if t and t["from"]:
        lines.append(f"transition   {t['from']} -> {t['to']} at {utc(t['at'])} "
                     f"(after {ago(t['after_s'])} in {t['from']})")
    d = st["driver"]
    lines.append(f"driver       configured {d['version_configured'] or '-'}, "
                 f"marker {d['version_marker'] or '-'}")
    for m, v in d["modules"].items():
        # decide's rule, the one the daemon reloads by (a module not loaded is no difference
        # unless it is one of the core)
        cmp = ModuleComparison(m, v["loaded"], v["installed"], present=bool(v.get("present")),
                               core=m in CORE)
        ok = "DIFFERS" if cmp.differs else ("ok" if cmp.present else "not loaded")
        lines.append(f"  {m:<11}loaded {v['loaded'] or 'not loaded'}, "
                     f"installed {v['installed'] or 'not found'}  {ok}")
    mk = st["marker"]
    lines.append(f"marker       {mk['path']}: " + (f"set {mk['time']}" if mk["set"]
                                                   else mk["error"]))
    v = st["vfs"]
    if v["restored"] is None:
        lines.append("VFs          no restore recorded" + (" (restore pending)"
                                                          if v["restore_pending"] else ""))
    else:
        failed = ", ".join(v["failed"]) or "none"
        strategy = v["strategy"]
        if isinstance(strategy, dict):
            strategy = ", ".join(f"{pf} {how}" for pf, how in sorted(strategy.items())) or "-"
        lines.append(f"VFs          {v['restored']} restored, {len(v['failed'])} failed "
                     f"({failed}); strategy {strategy}"
                     + ("; retried at next start" if v["restore_pending"] else ""))
    lk = st["lock"]
    holder = ("-" if not lk["pid"] else f"PID {lk['pid']} "
              + ("(running)" if lk["running"] else "(not running: lock free)"))
    lines.append(f"lock         {holder}")
    hb = st["heartbeat"]
    lines.append("heartbeat    " + ("-" if hb is None else f"{ago(hb['age_s'])} ago"
                                    + ("" if hb["running"] else ", daemon exited")
                                    + (", OVERDUE (step looks hung)" if hb["overdue"] else "")))
    lines.append(f"reason       {st['reason'] or '-'}")
    lines.append(f"last error   {st['last_error'] or '-'}")
    if st["modules_not_reloaded"]:
        lines.append(f"NOT LOADED   {', '.join(st['modules_not_reloaded'])} (unloaded for the "
                     "swap, could not be loaded back: modprobe NAME)")
    lines.append(f"stop budget  {st['stop_budget_s']:g}s (terminationGracePeriodSeconds, "
                 "TimeoutStopSec= at least this)")
    lines.append("doctor       " + (", ".join(f"{f['id']} ({f['subject']})" for f in st["doctor"])
                                    or "no finding") + " (at the last check; `mofed-lifecycle "
                 "doctor` for details)")
    return "\n".join(lines)
