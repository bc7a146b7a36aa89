"""`sim run`: build a node from a scenario, run the lifecycle on it, measure, and report.

The lifecycle runs as the real command (`mofed-lifecycle run --root DIR --once`, a subprocess with
the scenario's environment; under umockdev's preload when installed, so the daemon's pyudev code
path gets the simulated uevents). Every figure in the report is measured by the simulator — outcome
and VFs from the node's ground truth, `reloaded`, `restore_s` and `disruption_s` from its own kernel
timeline (`report.py`), the daemon's CPU time and peak RSS from `wait4` — except `phases`, which are
read from the daemon's journal, as the contract asks.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..config import load_config
from ..host.paths import NodePaths
from ..lifecycle.journal import journal_dir
from .build import build_env
from .build_run import DtkSidecar, build_report
from .client import KernelClient, clean_env
from .floor import probe_floor
from .node import init_node, stop_kernel
from .peermem_run import GpuSide, report_block
from .report import format_timeline, measure_restore, ratio
from .scenario import Scenario
from .uevent import umockdev_env

__all__ = ["SimRun", "format_timeline", "run_lifecycle", "run_scenario"]

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
    # the node's udev sees a blacklist after [udev] blacklist_lag_s (scaled): an operator of a
    # node this much faster would set the settle to match (the default, 3 s, is a real node's)
    env.setdefault("BLACKLIST_SETTLE_SEC", f"{max(0.001, 1.5 * sc.scaled(sc.blacklist_lag_s)):.4g}")
    env.update(build_env(sc))  # [build] sources/dtk: the variables of a sources image
    if sc.build.builds:  # a real node's 30 s between a build's progress lines, scaled
        env.setdefault("BUILD_PROGRESS_SEC", f"{min(30.0, max(0.05, sc.scaled(30.0))):.4g}")
    env.update(sc.env)
    return env


def lifecycle_timeout_s(sc: Scenario, env: dict[str, str]) -> float:
    config = load_config(env, require_driver_version=False)
    swap = sc.scaled(sc.openibd_restart_s) * (sc.openibd_failures + 1)
    build = sc.scaled(sc.build.build_s + sc.build.dtk_sidecar_start_s) if sc.build.builds else 0
    return 60.0 + (min(swap, config.openibd_timeout_s * config.openibd_attempts) + build) * 1.5


@dataclass
class LifecycleExit:
    """How the lifecycle process ended, and what it cost (its own rusage, from wait4)."""

    hint: str  # "exited" | "timeout"
    code: int | None
    seconds: float
    cpu_s: float | None = None
    max_rss_mib: float | None = None
    udev: str = "sim-stream"  # how the daemon got uevents: "pyudev+umockdev" | "sim-stream"
    argv: list[str] = field(default_factory=list)


def _wait4(pid: int, timeout: float | None) -> tuple[int, Any] | None:
    """Reap `pid` within `timeout` seconds (None: wait for ever): (status, rusage), or None."""
    if timeout is None:
        _, status, usage = os.wait4(pid, 0)
        return status, usage
    deadline = time.monotonic() + timeout
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # no pidfd (old kernel): poll below
    try:
        while True:
            got, status, usage = os.wait4(pid, os.WNOHANG)
            if got:
                return status, usage
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)  # readable once the process has exited
            else:
                time.sleep(min(left, 0.01))  # sleep-ok: bounded poll, only without pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)


def run_lifecycle(root: Path, sc: Scenario, *, env_overrides: dict[str, str] | None = None,
                  extra_args: list[str] | None = None) -> LifecycleExit:
    """Run `mofed-lifecycle run --once` on the node until it exits (SIGTERM, then SIGKILL, past
    its timeout), recording the daemon's CPU seconds and peak RSS."""
    env = {**lifecycle_env(sc), **(env_overrides or {})}
    timeout = lifecycle_timeout_s(sc, env)
    mocked = umockdev_env(root, env)
    mode = ["sources"] if sc.build.builds else []  # the sources image's command
    argv = [sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json", "run", *mode,
            "--root", str(root), "--once", *(extra_args or [])]
    log = (root / ".sim" / "lifecycle.log").open("ab")
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,  # noqa: S603
                                env=mocked or env)
        hint, done = "exited", _wait4(proc.pid, timeout)
        if done is None:  # only we reap it, so the pid is ours to signal until wait4 says so
            hint = "timeout"
            os.kill(proc.pid, signal.SIGTERM)
            done = _wait4(proc.pid, 30)
            if done is None:
                os.kill(proc.pid, signal.SIGKILL)
                done = _wait4(proc.pid, None)
        status, usage = done
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    finally:
        log.close()
    return LifecycleExit(
        hint=hint, code=proc.returncode if hint == "exited" else None,
        seconds=time.monotonic() - start,
        cpu_s=round(usage.ru_utime + usage.ru_stime, 4),
        max_rss_mib=round(usage.ru_maxrss / 1024, 2),  # KiB on Linux
        udev="pyudev+umockdev" if mocked else "sim-stream", argv=argv[2:])


def journal_of(root: Path, sc: Scenario) -> dict[str, Any]:
    config = load_config(lifecycle_env(sc), require_driver_version=False)
    path = journal_dir(NodePaths.at(root), config) / "journal.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
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


def cpu_seconds(pid: int) -> float | None:
    """A running process's CPU seconds so far (the simulated kernel's), None if it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def restore_figures(sc: Scenario, timeline: list[dict[str, Any]], before: dict[str, Any],
                    after: dict[str, Any]) -> dict[str, Any]:
    """The report's restore keys, measured from the kernel timeline and the ground truth."""
    m = measure_restore(timeline, before, after)
    limit = round(sc.restore_limit_s(), 6)
    node = (probe_floor(sc.vf_probes(), m["marks"]["pf_back"], sc.probe_parallel)
            if m["reloaded"] else None)
    return {
        "reloaded": m["reloaded"],
        "disruption_s": m["disruption_s"],
        "restore_s": m["restore_s"],
        "restore_limit_s": limit,
        "restore_ratio": ratio(m["restore_s"], limit),
        "restore_limit_node_s": node,
        "restore_ratio_node": ratio(m["restore_s"], node),
        "restore_marks": m["marks"],
        "vfs": m["vfs"],
    }


def node_dir() -> str | None:
    """Where `sim run` makes its temporary node: $TMPDIR if set, else tmpfs when there is one —
    real sysfs lives in memory, and on a disk the simulated kernel's file operations, not the
    daemon, would set the pace of a big restore."""
    if os.environ.get("TMPDIR"):
        return None
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def run_scenario(scenario: str | Path, *, root: Path | None = None, keep: bool = False,
                 env_overrides: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> SimRun:
    """Initialise the node, run the lifecycle on it, and build the report.

    `env_overrides` go over the scenario's [env]; `extra_args` are appended to `run --once`."""
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="mofed-sim-", dir=node_dir())) if root is None \
        else Path(root)
    sc = init_node(scenario, root, force=not own_root)
    gpu: GpuSide | None = None
    sidecar: DtkSidecar | None = None
    sidecar_exit: int | None = None
    try:
        with KernelClient(root) as k:
            state_before = k.call("state")
            kernel_pid = k.call("ping")["pid"]
            kernel_cpu = cpu_seconds(kernel_pid)
            peermem_loads = k.call("peermem")["loads"]
            start = time.time()
            env = {**lifecycle_env(sc), **(env_overrides or {})}
            if sc.gpu is not None:  # the GPU side's loader, started at [gpu] peermem_start_s
                gpu = GpuSide(root, sc, env, start)
            if sc.build.mode == "dtk":  # the pod's second container, started a little later
                sidecar = DtkSidecar(root, sc, env)
            ran = run_lifecycle(root, sc, env_overrides=env_overrides, extra_args=extra_args)
            end = time.time()
            sidecar_exit = sidecar.stop() if sidecar is not None else None
            sidecar = None
            if gpu is not None:
                gpu.finish(k, lifecycle_ok=ran.code == 0)
            kernel_cpu_end = cpu_seconds(kernel_pid)
            state_after = k.call("state")
        timeline = read_timeline(root, start)
        if gpu is not None:
            with KernelClient(root) as k:
                peermem = report_block(gpu, k, timeline, start, peermem_loads)
        journal = journal_of(root, sc)
        facts = journal.get("facts", {})
        outcome = measured_outcome(sc, ran.hint, ran.code, state_after)
        report: dict[str, Any] = {
            "scenario": sc.name,
            "time_scale": sc.time_scale,
            "outcome": outcome,
            "reloaded": False,
            "exit_code": ran.code,
            "reason": None if outcome == "ready" else (facts.get("reason")
                                                        or facts.get("last_error")),
            "phases": phases_since(journal, start, end),
            "duration_s": round(end - start, 4),
            **build_report(root, sc, facts, env, sidecar_exit, start),
            **restore_figures(sc, timeline, state_before, state_after),
            "daemon": {"cpu_s": ran.cpu_s, "max_rss_mib": ran.max_rss_mib, "udev": ran.udev,
                       "argv": ran.argv},
            # The simulator's own cost while the lifecycle ran: when it nears duration_s, the
            # simulated kernel, not the daemon, set the pace.
            "simulator": {"kernel_cpu_s": None if kernel_cpu is None or kernel_cpu_end is None
                          else round(kernel_cpu_end - kernel_cpu, 4)},
            "peermem": peermem if gpu is not None else None,
            "state_before": state_before,
            "state_after": state_after,
        }
        log = (root / ".sim" / "lifecycle.log").read_text(errors="replace").splitlines()
        return SimRun(root, report, timeline, log[-12:])
    finally:
        if gpu is not None:
            gpu.finish(None, lifecycle_ok=False)  # never leave a loader behind
        if sidecar is not None:
            sidecar.stop()
        stop_kernel(root)
        if own_root and not keep:
            shutil.rmtree(root, ignore_errors=True)
