"""The steps that bring VFs back: the restore, its unwinding after a failed swap, the inbox
driver put back on stop (a reload like any other). A mixin of `Steps` (steps.py)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from ..host.commands import CommandTimeout, run_command
from ..host.modules import read_module_facts
from ..peermem.presence import wait_for_peermem_unload
from ..sriov.model import Snapshot, untouched_pfs, without_vfs
from ..sriov.restore import restore
from ..sriov.snapshot import load_snapshot, pf_ifindexes
from .errors import StepFailed
from .machine import Outcome, State

if TYPE_CHECKING:
    from .runner import Runner


class RestoreSteps:
    def step_restore(self: Runner) -> Outcome:
        if self.swap_failed:  # the reload failed; the driver and its VFs are put back first
            return self.unwind_restore()
        self.restore_vfs(unwinding=False)
        return Outcome.OK

    def restore_vfs(self: Runner, *, unwinding: bool) -> None:
        """Restore the VFs still owed from the saved snapshot; StepFailed if some did not come
        back and the node may not be ready with them missing (or the swap failed anyway)."""
        pending = self.journal.facts.get("restore_pending")
        snap = self.pending_snapshot() if pending else None
        if snap is None:
            self.log.info("restore.skipped", why="no restore pending: no VF is touched")
            return
        done = set(self.journal.facts.get("restored_vfs") or [])
        untouched = untouched_pfs(snap, pf_ifindexes(self.node.paths, [p.pci for p in snap.pfs]))
        for pf in untouched:
            owed = [vf.pci for vf in pf.vfs if vf.pci not in done]
            self.log.info("restore.pf_untouched", pf=pf.pci, vfs=len(owed),
                          why="its netdev is the one the snapshot saw: the driver was not "
                              "reloaded under it, its VFs were never destroyed; not touched")
            done |= set(owed)
        # never overwrite a VF a previous restore brought back, nor a PF our reload never touched
        todo = without_vfs(snap, done)
        kept = {p.pci for p in untouched}
        todo = replace(todo, pfs=tuple(p for p in todo.pfs if p.pci not in kept))
        if not todo.pfs:
            self.journal.set(restore_pending=False, restored_vfs=sorted(done))
            self.log.info("restore.skipped", why="no PF was reloaded under its VFs: none is owed")
            return
        self.log.info("restore.started", pfs=len(todo.pfs), vfs=todo.vf_count,
                      already_restored=len(done), deadline_s=self.config.vf_restore_timeout_s,
                      workers=self.config.vf_restore_workers,
                      stop_requested=self.stop.is_set(), after_failed_swap=unwinding)
        # part of the critical section: a stop waits for it (bounded by its deadline), so a stop
        # never leaves the node without its VFs
        result = restore(self.node, todo, deadline_s=self.config.vf_restore_timeout_s,
                         workers=self.config.vf_restore_workers, stop=threading.Event(),
                         log=self.log)
        summary = result.to_json()
        done |= set(result.restored)
        self.journal.set(restore=summary, restore_pending=bool(result.failed),
                         restored_vfs=sorted(done))
        if not result.failed:
            self.log.info("restore.done", restored=len(result.restored),
                          duration_s=round(result.duration_s, 4), strategy=result.strategy)
            return
        for pci, why in sorted(result.failed.items()):
            self.log.error("restore.vf_not_restored", vf=pci, why=why)
        msg = (f"{len(result.failed)} of {snap.vf_count} VFs not restored: "
               + ", ".join(sorted(result.failed)))
        if unwinding or not self.config.ready_on_partial_restore:
            raise StepFailed(msg + ("" if unwinding else
                                    "; READY_ON_PARTIAL_RESTORE=false keeps the node not ready"))
        self.journal.set(last_error=msg)
        self.log.warning("restore.partial", restored=len(result.restored),
                         failed=sorted(result.failed),
                         next="the node is marked ready (READY_ON_PARTIAL_RESTORE=true); only "
                              "the missing VFs are retried from the saved snapshot at the "
                              "next start; VFs already restored are never touched again")

    def pending_snapshot(self: Runner) -> Snapshot:
        """The snapshot a pending restore replays (or its copy); a damaged one is a failure that
        says so, never "no restore pending" (the VFs it holds would be lost without a word)."""
        snap, damaged, used = load_snapshot(self.journal.dir)
        if damaged:
            self.log.error("snapshot.damaged", damaged=damaged, used=str(used) if used else None)
        if snap is None:
            raise StepFailed(f"a VF restore is pending but its saved snapshot "
                             f"{'is damaged: ' + damaged if damaged else 'is missing'}; the VFs "
                             "it held cannot be restored from it: recreate them by hand (sriov_"
                             "numvfs, ip link set PF vf N ...), then clear restore_pending by "
                             "moving the journal directory away")
        return snap

    def unwind_restore(self: Runner) -> Outcome:
        """After a failed swap (modules loaded back, blacklist gone): restore the VFs if the NIC
        driver is loaded, then fail, saying truthfully what the node was left with."""
        self.swap_failed = False
        failure = self.journal.facts.get("last_error") or "the driver swap failed"
        if "mlx5_core" not in read_module_facts(self.node.paths):
            vfs = ("NOT restored: mlx5_core is not loaded (the saved VF settings are kept for the "
                   "next run)")
        else:
            try:
                self.restore_vfs(unwinding=True)
                vfs = "restored (or none were owed)"
            except (StepFailed, OSError) as e:
                vfs = f"NOT all restored: {e} (the rest are retried at the next run)"
        self.journal.set(last_error=f"{failure}; VFs {vfs}")
        self.log.error("swap.unwound", node=self.node_left(State.FAILED), vfs=vfs,
                       not_reloaded=list(self.journal.facts.get("not_reloaded") or []))
        return Outcome.FAILED

    def restore_inbox_driver(self: Runner) -> None:
        """RESTORE_DRIVER_ON_POD_TERMINATION: put the host's driver back, if we swapped it."""
        if not self.config.restore_driver_on_termination:
            return
        if not self.journal.facts.get("reloaded_by_us"):
            self.log.info("inbox_restore.skipped", why="this node's driver was not reloaded by us")
            return
        wait_for_peermem_unload(self.node.paths, self.config, None, self.log)  # we are stopping
        # a reload like any other: its VFs are saved first and restored after it (and by the next
        # start if the stop is cut short: the snapshot stays pending until they are back)
        try:
            self.step_snapshot()
        except (StepFailed, OSError) as e:  # no saved VFs, no reload: do no harm
            self.log.error("inbox_restore.skipped", error=str(e),
                           next="the vendor driver stays loaded; the VFs could not be saved")
            return
        try:
            r = run_command(["mlnxofedctl", "--alt-mods", "force-restart"],
                            timeout_s=self.config.openibd_timeout_s, env=self.node.env,
                            what="restore the inbox driver")
        except (OSError, CommandTimeout) as e:
            self.log.error("inbox_restore.failed", error=str(e))
            r = None
        if r is not None and r.ok:
            self.journal.set(reloaded_by_us=False)
        elif r is not None:
            self.log.error("inbox_restore.failed", rc=r.returncode, stderr=r.stderr.strip(),
                           next="run `mlnxofedctl --alt-mods force-restart` on the node")
        if "mlx5_core" not in read_module_facts(self.node.paths):
            self.log.error("inbox_restore.no_driver", next="no mlx5_core is loaded: the VFs are "
                           "restored by the next start (their settings are saved)")
            return
        try:
            self.restore_vfs(unwinding=False)
        except (StepFailed, OSError) as e:
            self.log.error("inbox_restore.vfs_not_restored", error=str(e),
                           next="the next start restores the VFs still owed")
