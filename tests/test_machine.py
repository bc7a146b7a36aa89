"""The state machine's table, checked exhaustively and by random walks (no node needed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mofed_lifecycle.lifecycle.machine import (
    CRITICAL,
    TRANSITIONS,
    Outcome,
    State,
    TransitionError,
    is_terminal,
    next_state,
)

HAPPY_RELOAD = [State.LOCK, State.PROVISION, State.INSPECT, State.DECIDE, State.PREFLIGHT,
                State.SNAPSHOT, State.BLACKLIST, State.UNLOAD_AUX, State.RELOAD, State.RELOAD_AUX,
                State.UNBLACKLIST, State.RESTORE, State.MOUNT_HEADERS, State.READY, State.SERVE]


def walk(outcomes: list[Outcome], stop_at: int | None = None) -> list[State]:
    state, path = State.LOCK, [State.LOCK]
    for i, outcome in enumerate(outcomes):
        allowed = TRANSITIONS[state]
        if outcome not in allowed and not (outcome is Outcome.STOP and state not in CRITICAL):
            outcome = next(iter(allowed), Outcome.OK)
        state = next_state(state, outcome, stop_requested=stop_at is not None and i >= stop_at)
        path.append(state)
        if is_terminal(state):
            break
    return path


def test_the_reload_path_visits_every_step_in_order():
    outcomes = [Outcome.OK, Outcome.OK, Outcome.OK, Outcome.RELOAD] + [Outcome.OK] * 10
    assert walk(outcomes)[:len(HAPPY_RELOAD)] == HAPPY_RELOAD


def test_no_reload_goes_from_decide_straight_to_restore_and_ready():
    path = walk([Outcome.OK, Outcome.OK, Outcome.OK, Outcome.NO_RELOAD, Outcome.OK, Outcome.OK,
                 Outcome.OK])
    assert path == [State.LOCK, State.PROVISION, State.INSPECT, State.DECIDE, State.RESTORE,
                    State.MOUNT_HEADERS, State.READY, State.SERVE]
    assert not set(path) & CRITICAL


def test_a_refusal_touches_nothing_keeps_no_snapshot_and_rechecks():
    path = walk([Outcome.OK, Outcome.OK, Outcome.OK, Outcome.RELOAD, Outcome.REFUSED,
                 Outcome.RETRY])
    # the re-check starts again from provision (a no-op once the driver is installed)
    assert path[-3:] == [State.PREFLIGHT, State.REFUSED, State.PROVISION]
    assert not set(path) & (CRITICAL | {State.SNAPSHOT})


@pytest.mark.parametrize("failing", sorted(CRITICAL - {State.UNBLACKLIST}))
def test_a_failure_inside_the_swap_loads_back_what_was_unloaded_then_removes_the_blacklist(
        failing):
    for stop in (False, True):
        state, seen = failing, []
        while state is not State.UNBLACKLIST:
            state = next_state(state, Outcome.FAILED, stop_requested=stop)
            seen.append(state)
        if failing in (State.UNLOAD_AUX, State.RELOAD):
            assert seen == [State.RELOAD_AUX, State.UNBLACKLIST]


def test_a_stop_during_the_swap_waits_for_the_blacklist_to_go():
    state = State.BLACKLIST
    seen = []
    while state not in (State.STOPPING, State.STOPPED):
        state = next_state(state, Outcome.OK, stop_requested=True)
        seen.append(state)
    # ...and for the VFs to be back: restore is entered whatever was requested
    assert seen == [State.UNLOAD_AUX, State.RELOAD, State.RELOAD_AUX, State.UNBLACKLIST,
                    State.RESTORE, State.STOPPING]


def test_outside_the_swap_a_stop_is_honoured_at_the_next_boundary():
    for state in (State.INSPECT, State.DECIDE, State.PREFLIGHT, State.RESTORE, State.READY):
        assert next_state(state, Outcome.OK, stop_requested=True) is State.STOPPING
    assert next_state(State.SERVE, Outcome.STOP) is State.STOPPING
    assert next_state(State.STOPPING, Outcome.OK) is State.STOPPED


def test_an_outcome_the_table_does_not_allow_is_a_bug_not_a_guess():
    with pytest.raises(TransitionError):
        next_state(State.SERVE, Outcome.RELOAD)


def test_every_state_is_reachable_from_lock_and_every_non_terminal_state_can_end():
    reachable, frontier = {State.LOCK}, [State.LOCK]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()].values():
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable | {State.STOPPING} == set(State)
    assert [s for s in State if is_terminal(s)] == [State.STOPPED]


@settings(max_examples=300, deadline=None)
@given(outcomes=st.lists(st.sampled_from(list(Outcome)), min_size=1, max_size=60),
       stop_at=st.one_of(st.none(), st.integers(0, 60)))
def test_random_walks_never_leave_the_blacklist_behind(outcomes, stop_at):
    path = walk(outcomes, stop_at)
    for i, state in enumerate(path):
        if state is State.BLACKLIST:
            rest = path[i + 1:]
            # the blacklist is removed before anything but the swap itself happens
            if rest:
                end = next((j for j, s in enumerate(rest) if s not in CRITICAL), None)
                assert end is None or rest[end - 1] is State.UNBLACKLIST, path
                swap = rest[:end] if end is not None else rest
                if State.UNLOAD_AUX in swap and State.UNBLACKLIST in swap:
                    assert State.RELOAD_AUX in swap, path  # nothing left unloaded


def test_every_working_state_has_its_step_in_one_table():
    """The state machine's work is dispatched from `steps.STEPS` (no step found by building a
    name): every state but the runner's own waits and the stop has exactly one step."""
    from mofed_lifecycle.lifecycle.machine import State
    from mofed_lifecycle.lifecycle.steps import STEPS

    runners_own = {State.LOCK, State.SERVE, State.REFUSED, State.FAILED, State.STOPPING,
                   State.STOPPED}
    assert set(STEPS) == set(State) - runners_own


def test_ready_means_serving_and_nothing_else():
    """One definition of ready for status.json, the metric and the probe: only `serve` follows
    the marker being written (the `ready` step writes it)."""
    from mofed_lifecycle.lifecycle.machine import State, is_ready

    assert [s for s in State if is_ready(s)] == [State.SERVE]
    assert is_ready("serve") and not is_ready("ready") and not is_ready(None)
