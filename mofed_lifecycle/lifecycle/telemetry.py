"""What the runner tells the world besides its log: systemd (sd_notify), the heartbeat, metrics.

One object so the runner needs one call per event: `entered()` on every state change (STATUS=,
READY=1 on entering serve — the marker was just set by the ready step —, STOPPING=1 on entering
stopping, metrics), `stop_requested()` on SIGTERM, `start()`/`close()` around the locked run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config
from ..heartbeat import Heartbeat
from ..host.paths import NodePaths
from ..metrics import Metrics
from ..notify import Notifier
from .budget import state_budget_s
from .journal import Journal
from .machine import State

DOING = {
    State.LOCK: "holding the node lock",
    State.PROVISION: "building or installing the driver (sources mode)",
    State.INSPECT: "reading loaded and installed srcversions",
    State.DECIDE: "deciding whether to reload the driver",
    State.SNAPSHOT: "saving SR-IOV state",
    State.PREFLIGHT: "checking what holds the driver stack",
    State.BLACKLIST: "blacklisting the driver on the host for the reload",
    State.UNLOAD_AUX: "unloading auxiliary modules",
    State.RELOAD: "reloading the NIC driver (openibd restart)",
    State.RELOAD_AUX: "loading auxiliary modules again",
    State.UNBLACKLIST: "removing the host blacklist",
    State.RESTORE: "restoring VFs",
    State.MOUNT_HEADERS: "sharing kernel headers",
    State.READY: "checking srcversions, setting the readiness marker",
    State.STOPPING: "clearing the readiness marker",
    State.STOPPED: "stopped",
}


def status_text(state: State, facts: Mapping[str, Any], config: Config) -> str:
    """The one-line STATUS= for a state, e.g. `refused: nvme_rdma holds ib_core ...`."""
    if state is State.SERVE:
        return f"serve: driver {config.driver_version} ready, marker set"
    if state is State.REFUSED:
        return f"refused: {facts.get('reason') or 'reload not allowed'}; re-check in " \
               f"{config.recheck_interval_s:g}s"
    if state is State.FAILED:
        return f"failed: {facts.get('last_error') or 'a step failed'}; retry in " \
               f"{config.recheck_interval_s:g}s"
    return f"{state}: {DOING.get(state, str(state))}"


class Telemetry:
    def __init__(self, paths: NodePaths, config: Config, journal: Journal,
                 state: Callable[[], tuple[str | None, float]],
                 env: Mapping[str, str] | None = None) -> None:
        self.config, self.journal = config, journal
        self.notifier = Notifier(env)
        path = paths.resolve(config.metrics_textfile) if config.metrics_textfile else None
        self.metrics = Metrics(path, driver_version=config.driver_version)
        self.heartbeat = Heartbeat(journal.dir, config.heartbeat_interval_s, self.notifier, state,
                                   lambda s: state_budget_s(s, config))

    def start(self) -> None:
        self.heartbeat.start()

    def close(self) -> None:
        self.heartbeat.stop()

    def halt(self) -> None:
        """Stop the heartbeat without a last beat (the in-process stand-in for a killed run)."""
        self.heartbeat.halt()

    def entered(self, state: State) -> None:
        facts = self.journal.facts
        text = status_text(state, facts, self.config)
        if state is State.SERVE:
            self.notifier.ready(text)
        elif state is State.STOPPING:
            self.notifier.stopping(text)
        else:
            self.notifier.status(text)
        self.metrics.entered(str(state), self.journal.since, facts)

    def stop_requested(self, critical: bool) -> None:
        self.notifier.stopping("stopping: finishing the driver swap first" if critical
                               else "stopping")
