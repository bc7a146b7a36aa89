"""The steps that bring VFs back: the restore and its unwinding after a failed swap (the inbox
driver put back on stop, a reload like any other, is in steps.py and uses `restore_vfs`)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from ..host.modules import read_module_facts
from ..sriov.model import Snapshot, untouched_pfs, without_vfs
from ..sriov.restore import restore
from ..sriov.snapshot import load_snapshot, pf_ifindexes
from .errors import StepFailed
from .machine import Outcome, State
from .uplink import finish_uplink, reapply_uplink

if TYPE_CHECKING:
    from .runner import Runner


def step_restore(r: Runner) -> Outcome:
    try:
        if r.swap_failed:  # the reload failed; the driver and its VFs are put back first
            return unwind_restore(r)
        restore_vfs(r, unwinding=False)
        return Outcome.OK
    finally:  # the uplink, whatever the restore did (even nothing, after a crash)
        finish_uplink(r)

def restore_vfs(r: Runner, *, unwinding: bool) -> None:
    """Restore the VFs still owed from the saved snapshot; StepFailed if some did not come
    back and the node may not be ready with them missing (or the swap failed anyway)."""
    pending = r.journal.facts.get("restore_pending")
    snap = pending_snapshot(r) if pending else None
    if snap is None:
        r.log.info("restore.skipped", why="no restore pending: no VF is touched")
        return
    done = set(r.journal.facts.get("restored_vfs") or [])
    untouched = untouched_pfs(snap, pf_ifindexes(r.node.paths, [p.pci for p in snap.pfs]))
    for pf in untouched:
        owed = [vf.pci for vf in pf.vfs if vf.pci not in done]
        r.log.info("restore.pf_untouched", pf=pf.pci, vfs=len(owed),
                      why="its netdev is the one the snapshot saw: the driver was not "
                          "reloaded under it, its VFs were never destroyed; not touched")
        done |= set(owed)
    # never overwrite a VF a previous restore brought back, nor a PF our reload never touched
    todo = without_vfs(snap, done)
    kept = {p.pci for p in untouched}
    todo = replace(todo, pfs=tuple(p for p in todo.pfs if p.pci not in kept))
    if not todo.pfs:
        r.journal.set(restore_pending=False, restored_vfs=sorted(done))
        r.log.info("restore.skipped", why="no PF was reloaded under its VFs: none is owed")
        return
    r.log.info("restore.started", pfs=len(todo.pfs), vfs=todo.vf_count,
                  already_restored=len(done), deadline_s=r.config.vf_restore_timeout_s,
                  workers=r.config.vf_restore_workers, bind_workers=r.config.vf_bind_workers,
                  stop_requested=r.stop.is_set(), after_failed_swap=unwinding)
    # part of the critical section: a stop waits for it (bounded by its deadline), so a stop
    # never leaves the node without its VFs
    r.restore_waited |= {p.pci for p in todo.pfs}
    result = restore(r.node, todo, deadline_s=r.config.vf_restore_timeout_s,
                     workers=r.config.vf_restore_workers, stop=threading.Event(),
                     log=r.log, bind_workers=r.config.vf_bind_workers,
                     on_pf_back=lambda pci: reapply_uplink(r, pci))  # before that PF's VFs
    summary = result.to_json()
    done |= set(result.restored)
    r.journal.set(restore=summary, restore_pending=bool(result.failed),
                     restored_vfs=sorted(done))
    if not result.failed:
        r.log.info("restore.done", restored=len(result.restored),
                      duration_s=round(result.duration_s, 4), strategy=result.strategy)
        return
    for pci, why in sorted(result.failed.items()):
        r.log.error("restore.vf_not_restored", vf=pci, why=why)
    msg = (f"{len(result.failed)} of {snap.vf_count} VFs not restored: "
           + ", ".join(sorted(result.failed)))
    if unwinding or not r.config.ready_on_partial_restore:
        raise StepFailed(msg + ("" if unwinding else
                                "; READY_ON_PARTIAL_RESTORE=false keeps the node not ready"))
    r.journal.set(last_error=msg)
    r.log.warning("restore.partial", restored=len(result.restored),
                     failed=sorted(result.failed),
                     next="the node is marked ready (READY_ON_PARTIAL_RESTORE=true); only "
                          "the missing VFs are retried from the saved snapshot at the "
                          "next start; VFs already restored are never touched again")

def pending_snapshot(r: Runner) -> Snapshot:
    """The snapshot a pending restore replays (or its copy); a damaged one is a failure that
    says so, never "no restore pending" (the VFs it holds would be lost without a word)."""
    snap, damaged, used = load_snapshot(r.journal.dir)
    if damaged:
        r.log.error("snapshot.damaged", damaged=damaged, used=str(used) if used else None)
    if snap is None:
        raise StepFailed(f"a VF restore is pending but its saved snapshot "
                         f"{'is damaged: ' + damaged if damaged else 'is missing'}; the VFs "
                         "it held cannot be restored from it: recreate them by hand (sriov_"
                         "numvfs, ip link set PF vf N ...), then clear restore_pending by "
                         "moving the journal directory away")
    return snap

def unwind_restore(r: Runner) -> Outcome:
    """After a failed swap (modules loaded back, blacklist gone): restore the VFs if the NIC
    driver is loaded, then fail, saying truthfully what the node was left with."""
    r.swap_failed = False
    failure = r.journal.facts.get("last_error") or "the driver swap failed"
    if "mlx5_core" not in read_module_facts(r.node.paths):
        vfs = ("NOT restored: mlx5_core is not loaded (the saved VF settings are kept for the "
               "next run)")
    else:
        try:
            restore_vfs(r, unwinding=True)
            vfs = "restored (or none were owed)"
        except (StepFailed, OSError) as e:
            vfs = f"NOT all restored: {e} (the rest are retried at the next run)"
    r.journal.set(last_error=f"{failure}; VFs {vfs}")
    r.log.error("swap.unwound", node=r.node_left(State.FAILED), vfs=vfs,
                   not_reloaded=list(r.journal.facts.get("not_reloaded") or []))
    return Outcome.FAILED
