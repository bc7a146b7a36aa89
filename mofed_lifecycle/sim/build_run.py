"""`sim run` with `[build]`: the DTK sidecar beside the lifecycle, and the report's figures.

In `dtk` mode the sidecar (`mofed-lifecycle dtk-build`, a process of its own as the pod's second
container) is started `[build] dtk_sidecar_start_s` (scaled) after the lifecycle, with the
operator's DTK_OCP_NIC_SHARED_DIR, and stopped with SIGTERM when the run ends. The report gains
`provision` (mode, cache hit, builds: counted by the stand-in install.pl), `build_s` (first build
started -> packages installed, from the stand-ins' records) and `dtk_detect_s` (the done flag's
write -> the lifecycle noticed it: wall clock, unscaled).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..provision.plan import done_flag_name, sanitise_kernel
from .build import DEFAULT_DTK_SHARED, read_record
from .scenario import Scenario

STOP_WAIT_S = 10.0


class DtkSidecar:
    """The sidecar process of a `dtk` run: started after a delay, stopped at the end."""

    def __init__(self, root: Path, sc: Scenario, env: dict[str, str]) -> None:
        self.root, self.sc = root, sc
        self.env = {**env, "DTK_OCP_NIC_SHARED_DIR": env.get("DTK_OCP_NIC_SHARED_DIR",
                                                             DEFAULT_DTK_SHARED)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.timer = threading.Thread(target=self._start_later, daemon=True, name="dtk-sidecar")
        self.timer.start()

    def _start_later(self) -> None:
        if self.cancel.wait(self.sc.scaled(self.sc.build.dtk_sidecar_start_s)):
            return
        with self.lock:
            if self.cancel.is_set():
                return
            log = (self.root / ".sim" / "dtk-sidecar.log").open("ab")
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argument list
                [sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json",
                 "dtk-build", "--root", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env)
            log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> int | None:
        """SIGTERM it (as kubelet does), wait; its exit code (None: never started)."""
        self.cancel.set()
        with self.lock:
            proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


def shared_dir(sc: Scenario, env: dict[str, str], root: Path) -> Path:
    base = env.get("DTK_OCP_NIC_SHARED_DIR", DEFAULT_DTK_SHARED)
    return root / base.lstrip("/") / sanitise_kernel(sc.kernel)


def build_report(root: Path, sc: Scenario, facts: dict[str, Any], env: dict[str, str],
                 sidecar_exit: int | None, start: float) -> dict[str, Any]:
    """The report's provisioning keys (contract version 2)."""
    if not sc.build.builds:
        return {"provision": {"mode": "precompiled", "cache_hit": None, "builds": 0}}
    rows = read_record(root)
    starts = [r["t"] for r in rows if r["event"] == "build.start"]
    installed = [r["t"] for r in rows if r["event"] == "install.end"]
    prov = facts.get("provision") or {}
    out: dict[str, Any] = {
        "provision": {"mode": sc.build.mode, "cache_hit": prov.get("cache_hit"),
                      "builds": len(starts),
                      "failed_builds": sum(1 for r in rows if r["event"] == "build.fail")},
        "build_s": round(installed[-1] - starts[0], 4) if starts and installed else None,
        "build_events": [{"t": round(r["t"] - start, 4), "event": r["event"]} for r in rows
                         if r["t"] >= start],
    }
    if sc.build.mode == "dtk":
        flag = shared_dir(sc, env, root) / done_flag_name(sc.installed_version)
        noticed = prov.get("dtk_noticed_at")
        try:
            written = flag.stat().st_mtime
        except OSError:
            written = None
        out["dtk_detect_s"] = (round(noticed - written, 4) if noticed is not None and
                               written is not None else None)
        out["dtk_sidecar"] = {"exit_code": sidecar_exit}
        if noticed is not None and written is not None:
            out["build_events"] += [{"t": round(written - start, 4), "event": "dtk.done_flag"},
                                    {"t": round(noticed - start, 4), "event": "dtk.noticed"}]
    return out
