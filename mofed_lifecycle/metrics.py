"""Prometheus metrics for node_exporter's textfile collector (off unless METRICS_TEXTFILE is set).

The daemon is not a server: it rewrites one `.prom` file atomically (prometheus_client's
`write_to_textfile`: a temporary file beside it, then rename) on every state change, and
node_exporter (`--collector.textfile.directory`) serves it. In the driver container, point
METRICS_TEXTFILE into the drivers mount (e.g. `/run/mellanox/drivers/metrics/mofed_lifecycle.prom`):
the host sees the same path, so node_exporter can read it with no extra mount.

Metrics (counters restart from 0 with the daemon, as Prometheus expects of counters):
  mofed_lifecycle_state{mofed_lifecycle_state=...}     1 for the current state, 0 for the others
  mofed_lifecycle_state_since_seconds                  unix time the current state was entered
  mofed_lifecycle_ready                                1 while serving with the marker set
  mofed_lifecycle_state_entered_total{state}           states entered
  mofed_lifecycle_reloads_total                        driver reloads started
  mofed_lifecycle_phase_duration_seconds{phase}        how long the last visit of each state took
  mofed_lifecycle_vfs_restored / _vfs_failed           the last VF restore
  mofed_lifecycle_last_error_info{error}               the last error ("" when none)
  mofed_lifecycle_info{version,driver_version}         versions
The peermem loader is a separate process (its own unit, or the GPU side), so it writes its own file
next to this one (`peermem_textfile`): `PeermemMetrics` holds its counters, wired in by the
peermem loader (until then nothing writes them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Info,
    disable_created_metrics,
    write_to_textfile,
)

from . import __version__
from .lifecycle.machine import State, is_ready
from .log import get_logger

PREFIX = "mofed_lifecycle"
disable_created_metrics()  # type: ignore[no-untyped-call]  # no `*_created` series: a restart is visible in the counters anyway


def _write(path: Path | None, registry: CollectorRegistry, warned: list[bool]) -> bool:
    if path is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), registry)
        return True
    except OSError as e:
        if not warned:
            warned.append(True)
            get_logger("metrics").warning("metrics.write_failed", path=str(path), error=str(e),
                                          next="check METRICS_TEXTFILE's directory; the "
                                               "lifecycle goes on without metrics")
        return False


class Metrics:
    """The lifecycle's metrics; `entered()` on every state change rewrites the file."""

    def __init__(self, path: Path | None, *, driver_version: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.clock = path, clock
        self.registry = r = CollectorRegistry()
        self._warned: list[bool] = []
        self.state = Enum(PREFIX + "_state", "current lifecycle state",
                          states=[str(s) for s in State], registry=r)
        self.since = Gauge(PREFIX + "_state_since_seconds",
                           "unix time the current state was entered", registry=r)
        self.ready = Gauge(PREFIX + "_ready", "1 while serving with the readiness marker set",
                           registry=r)
        self.entered_total = Counter(PREFIX + "_state_entered", "states entered", ["state"],
                                     registry=r)
        self.reloads = Counter(PREFIX + "_reloads", "driver reloads started (openibd restart)",
                               registry=r)
        self.phase = Gauge(PREFIX + "_phase_duration_seconds",
                           "seconds the last visit of each state took", ["phase"], registry=r)
        self.vfs_restored = Gauge(PREFIX + "_vfs_restored", "VFs the last restore brought back",
                                  registry=r)
        self.not_reloaded = Gauge(PREFIX + "_modules_not_reloaded",
                                  "Modules a swap unloaded and could not load back (by name)",
                                  ["module"], registry=r)
        self.vfs_failed = Gauge(PREFIX + "_vfs_failed", "VFs the last restore could not restore",
                                registry=r)
        self.last_error = Info(PREFIX + "_last_error", "the last error (empty when none)",
                               registry=r)
        self.doctor = Gauge(PREFIX + "_doctor_findings", "node misconfigurations `doctor` "
                            "names now, by finding id and severity", ["id", "severity"],
                            registry=r)
        Info(PREFIX, "daemon and driver versions", registry=r).info(
            {"version": __version__, "driver_version": driver_version})
        self.last_error.info({"error": ""})
        self._current: tuple[str, float] | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def entered(self, state: str, since: float, facts: Mapping[str, Any]) -> None:
        """Record entering `state` at unix time `since`, with the journal's facts; write."""
        if self.path is None:
            return
        now = self.clock()
        if self._current is not None:
            prev, started = self._current
            self.phase.labels(prev).set(round(now - started, 6))
        self._current = (state, now)
        self.state.state(state)
        self.since.set(since)
        self.ready.set(1 if is_ready(state) else 0)
        self.entered_total.labels(state).inc()
        if state == str(State.RELOAD):
            self.reloads.inc()
        restore = facts.get("restore")
        if isinstance(restore, dict):
            self.vfs_restored.set(int(restore.get("restored", 0)))
            self.vfs_failed.set(len(restore.get("failed") or {}))
        self.not_reloaded.clear()
        for module in facts.get("not_reloaded") or []:
            self.not_reloaded.labels(module).set(1)
        self.last_error.info({"error": str(facts.get("last_error") or "")})
        self.doctor.clear()
        for f in facts.get("doctor") or []:
            g = self.doctor.labels(str(f.get("id")), str(f.get("severity")))
            g.inc()
        self.write()

    def write(self) -> bool:
        return _write(self.path, self.registry, self._warned)


def peermem_textfile(lifecycle_textfile: Path) -> Path:
    """The peermem loader's file, beside the lifecycle's: `<dir>/<stem>_peermem.prom`."""
    return lifecycle_textfile.with_name(lifecycle_textfile.stem + "_peermem.prom")


class PeermemMetrics:
    """nvidia-peermem load counters: defined here, counted and written by the peermem loader."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.registry = r = CollectorRegistry()
        self._warned: list[bool] = []
        self.loads = Counter(PREFIX + "_peermem_loads", "nvidia-peermem loads that succeeded",
                             registry=r)
        self.failures = Counter(PREFIX + "_peermem_failures", "nvidia-peermem loads that failed",
                                ["reason"], registry=r)
        self.loaded = Gauge(PREFIX + "_peermem_loaded", "1 while nvidia-peermem is loaded",
                            registry=r)

    def write(self) -> bool:
        return _write(self.path, self.registry, self._warned)
