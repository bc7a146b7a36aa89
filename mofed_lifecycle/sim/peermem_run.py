"""`sim run` with a `[gpu]` section: the peermem loader beside the lifecycle, and the simulator's
own record of what happened to nvidia-peermem.

`GpuSide.start` runs `mofed-lifecycle peermem --root DIR` (the real command, in the lifecycle's
environment) `peermem_start_s × time_scale` after the lifecycle started, and records — by inotify,
on the simulator's clock — when the NIC readiness marker appears and vanishes. `finish` lets the
loader settle once the lifecycle is done (until nvidia_peermem is loaded, the kernel says no load
can succeed now, the loader exits, or a grace period ends), then stops it (SIGTERM, then SIGKILL).
The report's `peermem` block is built from these records and the simulated kernel
(`peermem_report.py`), never from what the loader says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config
from ..host.inotify import FileWatcher
from ..host.paths import NodePaths
from .client import KernelClient
from .scenario import Scenario

GRACE_S = 10.0  # after the lifecycle is done: how long the loader may still take to load
STOP_S = 10.0  # SIGTERM -> exit, before SIGKILL


def loader_env(sc: Scenario, env: dict[str, str]) -> dict[str, str]:
    """The lifecycle's environment, with the loader's own durations scaled like every other
    duration of the scenario (unless its [env] sets them)."""
    out = dict(env)
    for var, real_s in (("PEERMEM_DEBOUNCE_SEC", 1.0), ("PEERMEM_RECHECK_SEC", 10.0)):
        out.setdefault(var, f"{max(0.005, sc.scaled(real_s)):g}")
    return out


class MarkerClock:
    """When the marker appeared and vanished, as the simulator saw it (wall clock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changes: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._watcher = FileWatcher([path])
        self._thread = threading.Thread(target=self._run, name="marker-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        present = False  # an absent marker at the start is not a change; a present one is
        while not self._stop.is_set():
            now = self.path.exists()
            if now != present:
                self.changes.append((time.time(), now))
                present = now
            self._watcher.wait(None)

    def close(self) -> None:
        self._stop.set()
        self._watcher.wake()
        self._thread.join(timeout=5)
        self._watcher.close()


@dataclass
class LoaderRun:
    """How the loader process ran (what the report says about the loader, not about peermem)."""

    started_at: float | None = None
    exited_by_itself: bool = False
    exit_code: int | None = None
    argv: list[str] = field(default_factory=list)


class GpuSide:
    def __init__(self, root: Path, sc: Scenario, env: dict[str, str], start: float) -> None:
        self.root, self.sc = root, sc
        self.env = loader_env(sc, env)
        config = load_config(self.env, require_driver_version=False)
        self.marker = MarkerClock(NodePaths.at(root).resolve(config.driver_ready_path))
        self.start_at = start + sc.scaled(sc.gpu.peermem_start_s if sc.gpu else 0.0)
        self.run = LoaderRun(argv=["--log-format", "json", "peermem", "--root", str(root)])
        self.proc: subprocess.Popen[bytes] | None = None
        self._cancel = threading.Event()
        self._finished = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._start_later, name="peermem-start",
                                        daemon=True)
        self._thread.start()

    def _start_later(self) -> None:
        if self._cancel.wait(max(0.0, self.start_at - time.time())):
            return
        with (self.root / ".sim" / "peermem.log").open("ab") as log:
            self.run.started_at = time.time()
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argument list
                [sys.executable, "-m", "mofed_lifecycle.cli", *self.run.argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env)
        self._started.set()

    def finish(self, k: KernelClient | None, *, lifecycle_ok: bool) -> LoaderRun:
        """Let the loader settle (only if the NIC side ended ready), then stop it. Idempotent."""
        if self._finished:
            return self.run
        self._finished = True
        if lifecycle_ok and k is not None:
            self._started.wait(max(0.0, self.start_at - time.time()) + 30)
            self._settle(k)
        else:
            self._cancel.set()
        self._thread.join(timeout=30)
        self.marker.close()
        if self.proc is not None:
            code = self.proc.poll()
            self.run.exited_by_itself = code is not None
            if code is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    code = self.proc.wait(STOP_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    code = self.proc.wait()
            self.run.exit_code = code
        return self.run

    def _settle(self, k: KernelClient) -> None:
        if self.proc is None:
            return
        watcher = FileWatcher([self.root / "sys/module/nvidia_peermem"])
        try:
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                info = k.call("peermem")
                if info["loaded"] or info["load_error"] is not None:
                    return  # loaded, or nothing the loader does can load it now
                watcher.wait(min(0.05, deadline - time.monotonic()))  # the module dir, or time
        finally:
            watcher.close()


__all__ = ["GpuSide", "LoaderRun", "MarkerClock", "loader_env", "report_block"]


def report_block(side: GpuSide, k: KernelClient, timeline: list[dict[str, Any]], start: float,
                 loads_before: int) -> dict[str, Any]:
    """The report's `peermem` block for a finished run (times relative to `start`)."""
    from .peermem_report import measure_peermem

    run = side.run
    loader = {"started_s": None if run.started_at is None else round(run.started_at - start, 4),
              "exited_by_itself": run.exited_by_itself, "exit_code": run.exit_code,
              "argv": run.argv}
    changes = [(round(t - start, 4), present) for t, present in side.marker.changes]
    return measure_peermem(timeline, k.call("peermem"), loads_before, changes, loader)
