"""The lifecycle's states and the one table of allowed transitions: pure, no I/O.

The runner performs a state's step on the node, reports an `Outcome`, and asks `next_state` where to
go. A stop request (SIGTERM) is honoured at the next boundary, except inside the critical section
(blacklist ... unblacklist), which is finished first: openibd is never killed mid-swap and the host
blacklist never outlives the run.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    LOCK = "lock"
    PROVISION = "provision"  # `run sources`: the driver built (or taken from the cache), installed
    INSPECT = "inspect"
    DECIDE = "decide"
    SNAPSHOT = "snapshot"
    PREFLIGHT = "preflight"
    BLACKLIST = "blacklist"
    UNLOAD_AUX = "unload-aux"
    RELOAD = "reload"
    RELOAD_AUX = "reload-aux"
    UNBLACKLIST = "unblacklist"
    RESTORE = "restore"
    MOUNT_HEADERS = "mount-headers"
    READY = "ready"
    SERVE = "serve"
    REFUSED = "refused"  # a reload is needed but not allowed: stay up, not ready, re-check
    FAILED = "failed"  # a step failed after its retries: stay up, not ready, retry later
    STOPPING = "stopping"
    STOPPED = "stopped"


class Outcome(StrEnum):
    OK = "ok"
    RELOAD = "reload"  # decide: the loaded driver differs from the installed one
    NO_RELOAD = "no-reload"  # decide: the installed driver is loaded
    REFUSED = "refused"  # preflight: a holder may not be unloaded
    FAILED = "failed"
    RETRY = "retry"  # refused/failed: the re-check period has passed
    STOP = "stop"


S, Oc = State, Outcome

# state -> {outcome -> next state}. Anything not listed is a bug in the runner, not a node problem.
TRANSITIONS: dict[State, dict[Outcome, State]] = {
    S.LOCK: {Oc.OK: S.PROVISION, Oc.FAILED: S.STOPPED},
    # before anything is read or decided: what modinfo reports is the driver provisioned here
    S.PROVISION: {Oc.OK: S.INSPECT, Oc.FAILED: S.FAILED},
    S.INSPECT: {Oc.OK: S.DECIDE, Oc.FAILED: S.FAILED},
    # preflight before the snapshot: the snapshot is taken at the last moment before the node is
    # touched, and a refused reload keeps none (settings changed while refused are never reverted)
    S.DECIDE: {Oc.RELOAD: S.PREFLIGHT, Oc.NO_RELOAD: S.RESTORE, Oc.FAILED: S.FAILED},
    S.PREFLIGHT: {Oc.OK: S.SNAPSHOT, Oc.REFUSED: S.REFUSED, Oc.FAILED: S.FAILED},
    S.SNAPSHOT: {Oc.OK: S.BLACKLIST, Oc.FAILED: S.FAILED},
    S.BLACKLIST: {Oc.OK: S.UNLOAD_AUX, Oc.FAILED: S.UNBLACKLIST},
    # a failed unload or reload still loads back every module unloaded for the swap
    S.UNLOAD_AUX: {Oc.OK: S.RELOAD, Oc.FAILED: S.RELOAD_AUX},
    S.RELOAD: {Oc.OK: S.RELOAD_AUX, Oc.FAILED: S.RELOAD_AUX},
    S.RELOAD_AUX: {Oc.OK: S.UNBLACKLIST, Oc.FAILED: S.UNBLACKLIST},
    S.UNBLACKLIST: {Oc.OK: S.RESTORE, Oc.FAILED: S.FAILED},
    S.RESTORE: {Oc.OK: S.MOUNT_HEADERS, Oc.FAILED: S.FAILED},
    S.MOUNT_HEADERS: {Oc.OK: S.READY, Oc.FAILED: S.FAILED},
    S.READY: {Oc.OK: S.SERVE, Oc.FAILED: S.FAILED},
    S.SERVE: {Oc.STOP: S.STOPPING},
    S.REFUSED: {Oc.RETRY: S.PROVISION},
    S.FAILED: {Oc.RETRY: S.PROVISION},
    S.STOPPING: {Oc.OK: S.STOPPED, Oc.FAILED: S.STOPPED},
    S.STOPPED: {},
}

# From writing the blacklist to the end of the VF restore the node is mid-swap: a stop waits for
# its end, so that a stop never leaves the host blacklist behind, a module unloaded, or the VFs
# gone (the restore is bounded by VF_RESTORE_TIMEOUT_SEC).
CRITICAL: frozenset[State] = frozenset({S.BLACKLIST, S.UNLOAD_AUX, S.RELOAD, S.RELOAD_AUX,
                                        S.UNBLACKLIST})
# States in which the node's driver may be half-swapped if the process died there.
SWAP_STATES: frozenset[State] = CRITICAL | {S.UNBLACKLIST}


def is_ready(state: State | str | None) -> bool:
    """The one definition of "ready" (status.json, the metric, the readiness probe): serving.
    The marker is written by the `ready` step, so only `serve` comes after it; every other state,
    `ready` included, is on its way there or away from it."""
    return state is not None and str(state) == S.SERVE.value


class TransitionError(RuntimeError):
    """The runner reported an outcome the table does not allow for the current state."""


def next_state(state: State, outcome: Outcome, *, stop_requested: bool = False) -> State:
    """Where the lifecycle goes from `state` after `outcome` (a stop waits out the swap).

    A failure inside the critical section still passes through `reload-aux` and `unblacklist`; a
    stop requested there is honoured once the VFs are restored (`restore` is entered from
    `unblacklist` whatever was requested, and stops only when it ends)."""
    if state in (S.STOPPING, S.STOPPED):
        return TRANSITIONS[state].get(outcome, S.STOPPED)
    if outcome is Oc.STOP or (stop_requested and state not in CRITICAL):
        if state is S.LOCK and outcome is Oc.FAILED:
            return S.STOPPED
        return S.STOPPING
    try:
        return TRANSITIONS[state][outcome]
    except KeyError:
        raise TransitionError(f"no transition from {state} on {outcome}") from None


def is_terminal(state: State) -> bool:
    return not TRANSITIONS[state]
