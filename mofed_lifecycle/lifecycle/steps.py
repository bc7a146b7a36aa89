"""What each state does on the node: thin, each returning an Outcome for `machine.next_state`.

The decisions are made by pure functions (`decide`, `preflight.plan`); these steps only read the
node, write the files the daemon owns and run the node's tools (argument lists, timeouts, output
logged) through `host/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from ..host.commands import CommandTimeout
from ..host.files import atomic_write_text
from ..host.modules import (
    ModuleCommandError,
    installed_srcversions,
    loaded_srcversions,
    modprobe,
    modprobe_remove,
    read_module_facts,
)
from ..peermem.presence import wait_for_peermem_unload
from ..provision.plan import Mode
from ..sriov.model import merge_pending
from ..sriov.snapshot import save_snapshot, take_snapshot
from ..sriov.validate import snapshot_problem
from .blacklist import remove_blacklist, write_blacklist
from .budget import BudgetSpent, ToolDeadline
from .decide import CORE, NFSRDMA_COMPARED, compared_modules, decide
from .doctor_step import run_doctor
from .errors import StepFailed
from .machine import Outcome, State
from .preflight import plan
from .steps_provision import preload_host_dependencies, step_provision
from .steps_restore import pending_snapshot, restore_vfs, step_restore
from .uplink import check_uplink, finish_uplink, reset_for_swap

if TYPE_CHECKING:
    from .runner import Runner



class OpenibdFailed(RuntimeError):
    pass


def step_inspect(r: Runner) -> Outcome:
    r.swap_failed = False  # a new cycle: a swap that failed earlier was unwound then
    if r.record_damaged:
        raise StepFailed(r.record_damaged + "; the node is left as it is, not ready: move "
                         f"{r.journal.dir} away to start afresh")
    modules = compared_modules(r.config)
    r.facts = read_module_facts(r.node.paths)
    r.loaded = loaded_srcversions(r.node.paths, modules)
    r.installed = installed_srcversions(modules, r.node.commands, ToolDeadline(r.config).timeout)
    if not r.doctor_ran:  # once per start; again before each reload (preflight)
        r.doctor_ran = True
        run_doctor(r, "start")
    if not any(r.installed.get(m) for m in CORE):
        hint = (" (this looks like a sources image, NVIDIA_NIC_DRIVER_PATH is set: its command "
                "is `mofed-lifecycle run sources`)" if r.config.driver_path and
                r.mode is Mode.PRECOMPILED else "")
        raise StepFailed("modinfo finds none of the installed driver's modules "
                         f"({', '.join(CORE)}): is the driver installed in this container "
                         f"and /lib/modules mounted?{hint}")
    return Outcome.OK

def step_decide(r: Runner) -> Outcome:
    r.decision = decide(r.loaded, r.installed, compared_modules(r.config),
                           present=set(r.facts))
    r.log.info("decision", reload=r.decision.reload, why=r.decision.explain())
    r.journal.set(decision=r.decision.to_json(), decision_text=r.decision.explain())
    if r.decision.reload:  # not ready from here on; a watching peermem loader steps aside
        r.clear_marker("a reload is needed")
        return Outcome.RELOAD
    if owed := owed_modules(r):  # a predecessor died after unloading
        r.log.warning("modules.owed", modules=owed,
                         why="a previous run was killed after unloading them for its swap")
        step_reload_aux(r)
    return Outcome.NO_RELOAD

def step_snapshot(r: Runner) -> Outcome:
    untouched = "the driver swap is not started, nothing was touched"
    r.require_saved(untouched)
    snap = take_snapshot(r.node.paths, r.node.netlink)
    pending = r.journal.facts.get("restore_pending")
    kept = pending_snapshot(r) if pending else None
    if kept is not None:  # VFs a previous restore did not bring back keep their saved state
        done = set(r.journal.facts.get("restored_vfs") or [])
        snap, carried = merge_pending(snap, kept, done)
        r.log.warning("snapshot.merged", carried=carried, taken_at=kept.taken_at,
                         why="a restore from the previous snapshot had not completed: its "
                             "unrestored VFs keep their saved settings, the others are "
                             "taken as they are now")
    if problem := snapshot_problem(snap):  # what the restore would read back, checked now
        raise StepFailed(f"the VFs' state cannot be saved for a restore ({problem}); "
                         f"{untouched}; check that PF in sysfs (ls -l /sys/bus/pci/devices/"
                         "PCI/) and report the value")
    path = save_snapshot(r.journal.dir, snap)
    if not r.journal.commit(restore_pending=True, restored_vfs=[],
                               snapshot={"pfs": len(snap.pfs), "vfs": snap.vf_count,
                                         "taken_at": snap.taken_at}):
        r.require_saved(untouched)
    r.log.info("snapshot.saved", path=str(path), pfs=len(snap.pfs), vfs=snap.vf_count,
                  per_pf={p.pci: p.numvfs for p in snap.pfs})
    return Outcome.OK

def step_preflight(r: Runner) -> Outcome:
    # A watching peermem loader unloads nvidia_peermem once the marker is gone (cleared at
    # startup): give it its budget, then decide on fresh module facts (presence.py).
    if wait_for_peermem_unload(r.node.paths, r.config, r.stop, r.log):
        r.facts = read_module_facts(r.node.paths)
    r.preflight = plan(r.facts, r.config)
    r.journal.set(preflight=r.preflight.to_json())
    run_doctor(r, "before the reload")
    if r.preflight.refused:
        reason = "; ".join(r.preflight.refusals) or r.preflight.refused
        r.journal.set(reason=reason)
        r.log.error("reload.refused", reason=reason, refusals=len(r.preflight.refusals),
                       recheck_in_s=r.config.recheck_interval_s,
                       next="the node is untouched; fix the reason and the daemon proceeds at "
                            "its next re-check")
        finish_uplink(r)  # an uplink an earlier (killed) run's reload took down: back now
        return Outcome.REFUSED
    try:
        refused = check_uplink(r)  # UPLINK_POLICY
    except StepFailed:
        raise
    except Exception as e:  # noqa: BLE001 - no reload without knowing the uplink is safe
        reason = f"the node's uplink could not be checked or saved: {type(e).__name__}: {e}"
        r.journal.set(reason=reason)
        r.log.error("reload.refused", reason=reason, recheck_in_s=r.config.recheck_interval_s,
                    next="the node is untouched; see the error, or set UPLINK_POLICY=ignore")
        refused = Outcome.REFUSED
    if refused is not None:
        finish_uplink(r)
        return refused
    r.journal.set(reason=None)
    r.log.info("preflight.ok", unload=list(r.preflight.unload),
                  reload_after=list(r.preflight.reload_after))
    return Outcome.OK

def step_blacklist(r: Runner) -> Outcome:
    if not r.journal.commit(blacklist_written=True):
        r.require_saved("the blacklist is not written, nothing was touched")
    saved = write_blacklist(r.blacklist_path, r.config.blacklist_modules,
                            r.journal.dir)
    r.log.info("blacklist.written", path=str(r.blacklist_path),
                  modules=list(r.config.blacklist_modules), user_file_saved=saved)
    if r.config.blacklist_settle_s > 0:
        r.log.info("blacklist.settling", seconds=r.config.blacklist_settle_s,
                   why="udev re-reads modprobe.d lazily; until it has, an alias load by the "
                       "host's udev would bring its own driver back mid-swap")
        # bounded (BLACKLIST_SETTLE_SEC, counted in the stop budget), not cut short by a stop:
        # the swap has begun
        time.sleep(r.config.blacklist_settle_s)  # sleep-ok: no event says udev re-read modprobe.d
    return Outcome.OK

def step_unload_aux(r: Runner) -> Outcome:
    assert r.preflight is not None
    # written before the first unload: whatever happens next (even SIGKILL: a killed
    # predecessor's list is kept), these are loaded back
    # openibd unloads the stack itself: what of it was loaded is owed back too unless openibd
    # completes (a failed or killed openibd can leave it unloaded, with every VF gone); a
    # completed openibd's choice (IPOIB_LOAD=no...) is left alone
    stack = [m for m in compared_modules(r.config) if m in r.facts]
    owed = list(r.journal.facts.get("unloaded_for_swap") or [])
    if not r.journal.commit(
            unloaded_for_swap=list(dict.fromkeys([*r.preflight.reload_after, *owed])),
            stack_owed=list(dict.fromkeys([*stack, *r.journal.facts.get("stack_owed",
                                                                           [])])),
            not_reloaded=[]):
        r.require_saved("no module is unloaded")
    reset_for_swap(r)  # a kept uplink save: all of it owed again after this reload
    deadline = ToolDeadline(r.config)  # however many holders, and however slow
    for name in r.preflight.unload:
        try:
            timeout = deadline.timeout(f"modprobe -r {name}")
        except BudgetSpent as e:
            raise StepFailed(f"{e}; {name} and the holders after it stay loaded") from None
        modprobe_remove([name], r.node.commands, timeout)
    return Outcome.OK

def step_reload(r: Runner) -> Outcome:
    r.journal.set(reloaded_by_us=True, reloaded_this_run=True)
    openibd = str(r.node.paths.resolve("/etc/init.d/openibd"))
    attempts = r.config.openibd_attempts
    try:
        preload_host_dependencies(r, ToolDeadline(r.config))
    except (BudgetSpent, CommandTimeout, OSError) as e:  # never a reason not to reload
        r.log.warning("dependency.preload_skipped", error=str(e))
    try:
        for attempt in Retrying(stop=stop_after_attempt(attempts), wait=wait_fixed(1),
                                retry=retry_if_exception_type((OpenibdFailed, CommandTimeout)),
                                sleep=r.sleep):
            with attempt:
                n = attempt.retry_state.attempt_number
                r.log.info("openibd.restart", attempt=n, of=attempts,
                              timeout_s=r.config.openibd_timeout_s)
                res = r.node.commands.run([openibd, "restart"],
                                          timeout_s=r.config.openibd_timeout_s,
                                          what="reload the NIC driver")
                if not res.ok:
                    raise OpenibdFailed(f"openibd restart exited {res.returncode}: "
                                        f"{(res.stderr or res.stdout).strip()[-300:]}")
        r.journal.set(stack_owed=[])  # openibd loaded the stack it is configured to
    except RetryError as e:
        cause = e.last_attempt.exception()
        raise StepFailed(f"the driver reload failed {attempts} times ({cause}); check what "
                         "holds the modules (lsmod) and the openibd output above") from None
    return Outcome.OK

def step_reload_aux(r: Runner) -> Outcome:
    """Load back every module unloaded for the swap, on success and on failure alike, plus
    the NFS/NVMe RDMA ULPs with ENABLE_NFSRDMA; name whatever could not be loaded."""
    owed = owed_modules(r)
    names = [*owed, *(NFSRDMA_COMPARED if r.config.enable_nfsrdma else ())]
    loaded = read_module_facts(r.node.paths)
    stack = set(r.journal.facts.get("stack_owed") or [])
    deadline = ToolDeadline(r.config)  # hanging modprobes cannot stretch a stop
    untried: list[str] = []
    for name in dict.fromkeys(names):
        if name in loaded:  # openibd loaded it back (or a dependency did): nothing to do
            continue
        try:
            load_back(r, name, deadline)
        except BudgetSpent:
            untried += [name] if name in owed else []
            continue
        except ModuleCommandError as e:  # the NIC driver may be fine; say what is missing
            if name in owed:  # an NFSRDMA ULP that is not installed is no loss
                r.log.error("module.reload_failed", module=name, error=str(e),
                               next=f"load it by hand: modprobe {name}")
            continue
        loaded = read_module_facts(r.node.paths)  # its dependencies came with it
        if name in loaded:
            r.log.warning("module.loaded_back", module=name,
                             why="unloaded for the swap and not loaded again by openibd"
                             if name in owed else "ENABLE_NFSRDMA=true")
    missing = sorted(m for m in owed if m not in loaded)  # checked, not assumed
    for name in missing:
        r.log.error("module.not_loaded_back", module=name,
                       why="not tried: the step's tool budget was spent" if name in untried
                       else "its modprobe failed (above)",
                       next=f"load it by hand: modprobe {name}; check dmesg")
    # the ones never tried stay owed, as what they were: the next start tries them again
    r.journal.set(not_reloaded=missing,
                     unloaded_for_swap=[m for m in untried if m not in stack],
                     stack_owed=[m for m in untried if m in stack])
    return Outcome.OK

def load_back(r: Runner, name: str, deadline: ToolDeadline) -> None:
    """modprobe NAME from the installed driver's tree; if that build does not fit the stack
    loaded now (a swap that failed before openibd unloaded the old stack), from the host's
    tree (`modprobe -d /host`), where the modules that were loaded before came from."""
    try:
        modprobe([name], r.node.commands, deadline.timeout(f"modprobe {name}"))
        return
    except ModuleCommandError as e:
        host = r.node.paths.resolve("/host")
        # a modprobe that hung (killed: no exit code) is not a build that does not fit
        if e.returncode is None or not (host / "lib" / "modules").is_dir():
            raise
    modprobe([name], r.node.commands, deadline.timeout(f"modprobe -d {host} {name}"),
             dirname=host)
    r.log.info("module.loaded_from_host", module=name, tree=str(host),
                  why="the installed driver's build does not fit the stack loaded now")

def owed_modules(r: Runner) -> list[str]:
    """Modules the swap unloaded and must load back: the holders and aux modules, and the
    stack modules that were loaded before it while openibd has not completed."""
    facts = r.journal.facts
    return list(dict.fromkeys([*(facts.get("stack_owed") or []),
                               *(facts.get("unloaded_for_swap") or [])]))

def step_unblacklist(r: Runner) -> Outcome:
    done = remove_blacklist(r.blacklist_path, r.journal.dir)
    if done in ("removed", "restored"):
        r.log.info("blacklist.removed", path=str(r.blacklist_path),
                      user_file=done == "restored")
    r.journal.set(blacklist_written=False)
    # a failed swap goes on to the restore too: the VFs come back if the driver did
    return Outcome.OK

def step_mount_headers(r: Runner) -> Outcome:
    # the NIC driver is ready regardless; the GPU side needs them to build peermem (logged)
    r.headers_mounted = r.headers.mount(mounted_by_us=r.headers_mounted)
    return Outcome.OK

def step_ready(r: Runner) -> Outcome:
    # reported only now: a swap under way was finished and the VFs restored first
    r.require_saved("the node is not marked ready while a restart could not resume from "
                       "what it did", starting=False)
    modules = compared_modules(r.config)
    now = decide(loaded_srcversions(r.node.paths, modules), r.installed, modules,
                 present=set(read_module_facts(r.node.paths)))
    if now.reload:
        raise StepFailed("the loaded driver is not the installed one: " + now.explain())
    marker: dict[str, Any] = {
        "driver_version": r.config.driver_version,
        "srcversions": now.loaded_srcversions,
        "reloaded": bool(r.journal.facts.get("reloaded_this_run")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pid": r.pid,
    }
    if now.to_load:
        r.log.warning("modules.not_loaded", modules=list(now.to_load),
                         why="installed but not loaded; not a reason to reload",
                         next="load them by hand (modprobe NAME) if this node needs them")
    atomic_write_text(r.marker_path, json.dumps(marker) + "\n")  # replaced, never absent
    r.log.info("marker.set", path=str(r.marker_path), **marker)
    return Outcome.OK


def restore_inbox_driver(r: Runner) -> None:
    """RESTORE_DRIVER_ON_POD_TERMINATION: put the host's driver back, if we swapped it."""
    if not r.config.restore_driver_on_termination:
        return
    if not r.journal.facts.get("reloaded_by_us"):
        r.log.info("inbox_restore.skipped", why="this node's driver was not reloaded by us")
        return
    wait_for_peermem_unload(r.node.paths, r.config, None, r.log)  # we are stopping
    # a reload like any other: its VFs are saved first and restored after it (and by the next
    # start if the stop is cut short: the snapshot stays pending until they are back)
    try:
        step_snapshot(r)
    except (StepFailed, OSError) as e:  # no saved VFs, no reload: do no harm
        r.log.error("inbox_restore.skipped", error=str(e),
                       next="the vendor driver stays loaded; the VFs could not be saved")
        return
    try:
        refused = check_uplink(r) is not None  # the uplink on a PF, UPLINK_POLICY=refuse (a VLAN)
        why = r.journal.facts.get("reason")
        if not refused:
            reset_for_swap(r)  # a kept save: this reload takes down what was put back
    except Exception as e:  # noqa: BLE001 - (its save failed): no reload, the stop goes on
        refused, why = True, f"the uplink could not be checked or saved: {e}"
    if refused:
        r.log.error("inbox_restore.skipped", why=why,
                    next="the vendor driver stays loaded; put the inbox one back by hand "
                         "(mlnxofedctl --alt-mods force-restart) once the uplink is elsewhere")
        return
    try:
        res = r.node.commands.run(["mlnxofedctl", "--alt-mods", "force-restart"],
                                  timeout_s=r.config.openibd_timeout_s,
                                  what="restore the inbox driver")
    except (OSError, CommandTimeout) as e:
        r.log.error("inbox_restore.failed", error=str(e))
        res = None
    if res is not None and res.ok:
        r.journal.set(reloaded_by_us=False)
    elif res is not None:
        r.log.error("inbox_restore.failed", rc=res.returncode, stderr=res.stderr.strip(),
                       next="run `mlnxofedctl --alt-mods force-restart` on the node")
    if "mlx5_core" not in read_module_facts(r.node.paths):
        r.log.error("inbox_restore.no_driver", next="no mlx5_core is loaded: the VFs are "
                       "restored by the next start (their settings are saved)")
        return
    try:
        restore_vfs(r, unwinding=False)
    except (StepFailed, OSError) as e:
        r.log.error("inbox_restore.vfs_not_restored", error=str(e),
                       next="the next start restores the VFs still owed")
    finally:
        finish_uplink(r, stopping=True)


Step = Callable[["Runner"], Outcome]
# Every state that does work on the node, and its step (the waits, serve/refused/failed, and
# stopping are the runner's own: runner.perform).
STEPS: dict[State, Step] = {
    State.PROVISION: step_provision,
    State.INSPECT: step_inspect, State.DECIDE: step_decide, State.PREFLIGHT: step_preflight,
    State.SNAPSHOT: step_snapshot, State.BLACKLIST: step_blacklist,
    State.UNLOAD_AUX: step_unload_aux, State.RELOAD: step_reload, State.RELOAD_AUX: step_reload_aux,
    State.UNBLACKLIST: step_unblacklist, State.RESTORE: step_restore,
    State.MOUNT_HEADERS: step_mount_headers, State.READY: step_ready,
}
