"""`sim run`: build a node from a scenario, run the lifecycle on it, measure, and report.

The lifecycle runs as the real command (`mofed-lifecycle run --root DIR --once`, a subprocess with
the scenario's environment). Every figure in the report is measured by the simulator — outcome from
the node's ground truth, `reloaded` and timings from its own kernel timeline — except `phases`,
which are read from the daemon's journal, as the contract asks.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import load_config
from ..host.paths import NodePaths
from .client import KernelClient, clean_env
from .node import init_node, stop_kernel
from .scenario import Scenario

COMPARED = ("mlx5_core", "mlx5_ib", "ib_core")


@dataclass
class SimRun:
    root: Path
    report: dict[str, Any]
    timeline: list[dict[str, Any]]
    log_tail: list[str]


def read_timeline(root: Path, since: float) -> list[dict[str, Any]]:
    path = root / ".sim" / "timeline.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**r, "t": round(r["t"] - since, 4)} for r in rows if r["t"] >= since]


def lifecycle_env(sc: Scenario) -> dict[str, str]:
    """The environment the operator would inject: the scenario's [env] over the defaults."""
    env = clean_env()
    env.setdefault("NVIDIA_NIC_DRIVER_VER", sc.installed_version)
    env.update(sc.env)
    return env


def lifecycle_timeout_s(sc: Scenario, env: dict[str, str]) -> float:
    config = load_config(env, require_driver_version=False)
    swap = sc.scaled(sc.openibd_restart_s) * (sc.openibd_failures + 1)
    return 60.0 + min(swap, config.openibd_timeout_s * config.openibd_attempts) * 1.5


def run_lifecycle(root: Path, sc: Scenario) -> tuple[str, int | None, float]:
    """Run `mofed-lifecycle run --once` on the node: (outcome hint, exit code, seconds)."""
    env = lifecycle_env(sc)
    log = (root / ".sim" / "lifecycle.log").open("ab")
    start = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - fixed argument list
        [sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json", "run",
         "--root", str(root), "--once"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
    )
    try:
        code = proc.wait(timeout=lifecycle_timeout_s(sc, env))
        return ("exited", code, time.monotonic() - start)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return ("timeout", None, time.monotonic() - start)
    finally:
        log.close()


def journal_of(root: Path, sc: Scenario) -> dict[str, Any]:
    config = load_config(lifecycle_env(sc), require_driver_version=False)
    path = NodePaths.at(root).resolve(config.drivers_mount) / "mofed-lifecycle" / "journal.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def phases_since(journal: dict[str, Any], start: float, end: float) -> list[dict[str, Any]]:
    entries = [h for h in journal.get("history", []) if "state" in h and h["at"] >= start]
    out = []
    for i, h in enumerate(entries):
        stop = entries[i + 1]["at"] if i + 1 < len(entries) else max(end, h["at"])
        out.append({"name": h["state"], "start_s": round(h["at"] - start, 4),
                    "end_s": round(stop - start, 4)})
    return out


def measured_outcome(sc: Scenario, hint: str, code: int | None, after: dict[str, Any]) -> str:
    """ready only if the node says so: installed srcversions loaded, marker set, no blacklist."""
    if hint == "timeout":
        return "timeout"
    mods = after["modules"]
    installed = all(mods.get(m, {}).get("srcversion") == sc.installed_srcversion(m)
                    for m in COMPARED)
    marker = after["markers"].get("run/mellanox/drivers/.driver-ready", False)
    return "ready" if code == 0 and installed and marker and not after["blacklist_files"] else (
        "failed")


def run_scenario(scenario: str | Path, *, root: Path | None = None, keep: bool = False) -> SimRun:
    """Initialise the node, run the lifecycle on it, and build the report."""
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="mofed-sim-")) if own_root else Path(root)
    sc = init_node(scenario, root, force=not own_root)
    try:
        with KernelClient(root) as k:
            state_before = k.call("state")
            start = time.time()
            hint, code, _took = run_lifecycle(root, sc)
            end = time.time()
            state_after = k.call("state")
        timeline = read_timeline(root, start)
        journal = journal_of(root, sc)
        facts = journal.get("facts", {})
        vfs_total = sum(len(p.vfs) for p in sc.pfs)
        outcome = measured_outcome(sc, hint, code, state_after)
        report: dict[str, Any] = {
            "scenario": sc.name,
            "time_scale": sc.time_scale,
            "outcome": outcome,
            "reloaded": any(e["event"] == "openibd.loaded" for e in timeline),
            "exit_code": code,
            "reason": None if outcome == "ready" else (facts.get("reason")
                                                        or facts.get("last_error")),
            "phases": phases_since(journal, start, end),
            "duration_s": round(end - start, 4),
            "disruption_s": None,  # filled once VFs are restored (SR-IOV issue)
            "restore_s": None,
            "restore_limit_s": round(sc.restore_limit_s(), 6),
            "vfs": {"total": vfs_total, "restored": None, "failed": []},
            "peermem": None,
            "state_before": state_before,
            "state_after": state_after,
        }
        log = (root / ".sim" / "lifecycle.log").read_text(errors="replace").splitlines()
        return SimRun(root, report, timeline, log[-12:])
    finally:
        stop_kernel(root)
        if own_root and not keep:
            shutil.rmtree(root, ignore_errors=True)


def grouped_events(timeline: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """Kernel events for humans: a run of the same event (50 netdevs removed) is one line."""
    out: list[tuple[float, str]] = []
    i = 0
    while i < len(timeline):
        ev = timeline[i]
        j = i
        while j + 1 < len(timeline) and timeline[j + 1]["event"] == ev["event"]:
            j += 1
        detail = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("t", "event"))
        if j == i:
            out.append((ev["t"], f"{ev['event']}  {detail}"))
        else:
            last = timeline[j]
            out.append((ev["t"], f"{ev['event']} x{j - i + 1} until {last['t']:.4f}s  (first: "
                                 f"{detail})"))
        i = j + 1
    return out


def format_timeline(run: SimRun) -> str:
    """A short human timeline: the node, the lifecycle's states and the kernel's events, outcome."""
    r = run.report
    before = r["state_before"]
    mods = before["modules"]
    lines = [
        f"scenario {r['scenario']}  (time_scale {r['time_scale']}: divide times by it for a "
        "real node)",
        f"  node: kernel {before['kernel']}, driver {before['driver']['loaded_version']} loaded "
        f"(mlx5_core {mods.get('mlx5_core', {}).get('srcversion', '-')})",
    ]
    for pci, pf in before["pfs"].items():
        lines.append(f"  PF {pci} {pf['name']} ({pf['link']}, mtu {pf['mtu']}, eswitch "
                     f"{pf['eswitch']}): {pf['numvfs']} VFs")
    rows = [(p["start_s"], f"state  {p['name']}") for p in r["phases"]]
    rows += [(t, f"kernel {text}") for t, text in grouped_events(run.timeline)]
    for t, text in sorted(rows, key=lambda x: x[0]):
        lines.append(f"  {t:9.4f}s  {text}")
    lines.append(f"  outcome: {r['outcome']}  reloaded: {r['reloaded']}  exit code: "
                 f"{r['exit_code']}  took {r['duration_s']:.3f}s")
    if r["reason"]:
        lines.append(f"  reason: {r['reason']}")
    lines.append(f"  restore floor for this node (restore_limit_s): {r['restore_limit_s']:.4f}s; "
                 "VF restore lands with the SR-IOV issue")
    if r["outcome"] != "ready" and run.log_tail:
        lines.append("  last lines of the daemon's log:")
        lines += [f"    {line}" for line in run.log_tail]
    return "\n".join(lines)
