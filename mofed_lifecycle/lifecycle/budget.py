"""How long each state may take, and the worst case from SIGTERM to exit: pure, from the config.

Every command the lifecycle runs has a timeout, and the commands of one step share a budget
(`ToolDeadline`): however many modules a node has to unload or load back, and however many of their
`modprobe`s hang, a step ends within its budget. The heartbeat's "overdue" bound (`state_budget_s`)
and the SIGTERM budget printed by `status` (`stop_budget_s`) are computed from the same figures, so
the printed budget bounds the real worst case.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Config
from ..host.commands import DRAIN_S
from .machine import State

TOOL_CALLS_PER_STEP = 2  # a step's tool calls together get this many TOOL_TIMEOUT_SEC
MIN_CALL_SHARE = 0.25  # of TOOL_TIMEOUT_SEC: what must be left of the budget to start a command
# a killed command is waited for DRAIN_S (then left: stuck in the kernel), its output read for
# DRAIN_S more; a second for the rest
COMMAND_OVERRUN_S = 2 * DRAIN_S + 1.0
# states that run no command: file writes and sysfs/netlink reads (a 10,000-VF snapshot included)
STEP_BUDGET_S = 900.0
MARGIN_S = 120.0  # on a state's budget before the heartbeat calls it hung
STOP_MARGIN_S = 30.0  # on the SIGTERM budget: the states between the steps, the last journal write
# the states compare equal to their names: a state read back from heartbeat.json works too
UNBOUNDED = frozenset({State.SERVE, State.REFUSED, State.FAILED, State.STOPPED})  # stop Event
TOOL_STATES = frozenset({State.INSPECT, State.DECIDE, State.UNLOAD_AUX, State.RELOAD_AUX})


def tools_budget_s(config: Config) -> float:
    """What the tool calls of one step (modinfo of the stack, modprobe -r of the holders, the
    modules loaded back) may take together."""
    return TOOL_CALLS_PER_STEP * config.tool_timeout_s


class BudgetSpent(TimeoutError):
    """A step's tool budget is spent: the commands not started yet are not run."""


class ToolDeadline:
    """The tool calls of one step share its budget: each gets the per-call timeout or what is
    left of the budget, whichever is less."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_call_s, self.total_s, self.clock = (config.tool_timeout_s,
                                                     tools_budget_s(config), clock)
        self.end = clock() + self.total_s
        # never start a command with less than this: one killed half-way through a module load
        # is worse than one not started
        self.min_call_s = MIN_CALL_SHARE * self.per_call_s

    def timeout(self, what: str) -> float:
        """The timeout for the next call; BudgetSpent (naming `what`) if too little is left."""
        left = self.end - self.clock()
        if left < self.min_call_s:
            raise BudgetSpent(f"{what} not started: this step's tool budget "
                              f"({self.total_s:g}s, TOOL_TIMEOUT_SEC x {TOOL_CALLS_PER_STEP}) is "
                              "spent on commands that did not finish")
        return min(self.per_call_s, left)


def state_budget_s(state: str | None, config: Config) -> float | None:
    """How long the daemon may stay in `state` before it counts as hung (None: no bound)."""
    if state is None or state in UNBOUNDED:
        return None
    if state == State.RELOAD:
        return reload_s(config) + MARGIN_S
    if state == State.RESTORE:
        return config.vf_restore_timeout_s + MARGIN_S
    if state == State.STOPPING:
        return inbox_restore_s(config) + MARGIN_S
    if state in TOOL_STATES:
        return tools_budget_s(config) + COMMAND_OVERRUN_S + MARGIN_S
    if state == State.PREFLIGHT:  # a watching peermem loader is given its time to unload
        return config.peermem_unload_wait_s + MARGIN_S
    if state == State.MOUNT_HEADERS:
        return config.tool_timeout_s + COMMAND_OVERRUN_S + MARGIN_S
    if state == State.PROVISION:  # a build (here or by the DTK sidecar), then the install
        return (max(config.build_timeout_s, config.dtk_build_timeout_s) + 2 * (
            config.tool_timeout_s + COMMAND_OVERRUN_S) + MARGIN_S)
    return STEP_BUDGET_S


def reload_s(config: Config) -> float:
    """Every openibd attempt run to its timeout (and killed), 1 s apart."""
    n = config.openibd_attempts
    return n * (config.openibd_timeout_s + COMMAND_OVERRUN_S) + (n - 1) * 1.0


def inbox_restore_s(config: Config) -> float:
    """RESTORE_DRIVER_ON_POD_TERMINATION: the peermem loader's unload, mlnxofedctl to its timeout,
    the VFs restored on the inbox driver."""
    if not config.restore_driver_on_termination:
        return 0.0
    return (config.peermem_unload_wait_s + config.openibd_timeout_s + COMMAND_OVERRUN_S
            + config.vf_restore_timeout_s)


def stop_budget_s(config: Config) -> float:
    """Worst case from SIGTERM to exit. SIGTERM lands as the swap starts: the swap is finished
    (the holders unloaded, every openibd attempt to its timeout, the modules loaded back: each
    step within its tool budget, however many of its modprobes hang), the VFs are restored (up to
    VF_RESTORE_TIMEOUT_SEC: a stop never leaves the node without them), then the stop itself
    (the inbox driver put back with RESTORE_DRIVER_ON_POD_TERMINATION). A SIGTERM anywhere else
    ends sooner: outside the swap the current step ends (within its budget) and the daemon stops.
    Size terminationGracePeriodSeconds and TimeoutStopSec= to at least this; kubelet and systemd
    only wait as long as the process runs."""
    step = tools_budget_s(config) + COMMAND_OVERRUN_S
    swap = (config.blacklist_settle_s + step + reload_s(config) + step
            + config.vf_restore_timeout_s)
    return swap + inbox_restore_s(config) + STOP_MARGIN_S
