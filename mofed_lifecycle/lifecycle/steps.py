"""What each state does on the node: thin, each returning an Outcome for `machine.next_state`.

The decisions are made by pure functions (`decide`, `preflight.plan`); these steps only read the
node, write the files the daemon owns and run the node's tools (argument lists, timeouts, output
logged) through `host/`.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from ..host.commands import CommandTimeout, run_command
from ..host.files import atomic_write_text, remove_file
from ..host.modules import (
    ModuleCommandError,
    installed_srcversions,
    loaded_srcversions,
    modprobe,
    modprobe_remove,
    read_module_facts,
)
from ..peermem.presence import wait_for_peermem_unload
from ..sriov.model import merge_pending
from ..sriov.snapshot import save_snapshot, take_snapshot
from ..sriov.validate import snapshot_problem
from .blacklist import remove_blacklist, write_blacklist
from .budget import BudgetSpent, ToolDeadline, tools_budget_s
from .decide import CORE, NFSRDMA_COMPARED, compared_modules, decide
from .errors import StepFailed
from .machine import Outcome
from .preflight import plan
from .steps_restore import RestoreSteps

if TYPE_CHECKING:
    from .runner import Runner



class OpenibdFailed(RuntimeError):
    pass


class Steps(RestoreSteps):
    """State steps of the Runner (see runner.py for the loop, the journal and signals)."""

    def step_inspect(self: Runner) -> Outcome:
        self.swap_failed = False  # a new cycle: a swap that failed earlier was unwound then
        if self.record_damaged:
            raise StepFailed(self.record_damaged + "; the node is left as it is, not ready: move "
                             f"{self.journal.dir} away to start afresh")
        modules = compared_modules(self.config)
        self.facts = read_module_facts(self.node.paths)
        self.loaded = loaded_srcversions(self.node.paths, modules)
        self.installed = installed_srcversions(modules, self.node.env, self.config.tool_timeout_s,
                                               tools_budget_s(self.config))
        if not any(self.installed.get(m) for m in CORE):
            raise StepFailed("modinfo finds none of the installed driver's modules "
                             f"({', '.join(CORE)}): is the driver installed in this container "
                             "and /lib/modules mounted?")
        return Outcome.OK

    def step_decide(self: Runner) -> Outcome:
        self.decision = decide(self.loaded, self.installed, compared_modules(self.config),
                               present=set(self.facts))
        self.log.info("decision", reload=self.decision.reload, why=self.decision.explain())
        self.journal.set(decision=self.decision.to_json(), decision_text=self.decision.explain())
        if self.decision.reload:  # not ready from here on; a watching peermem loader steps aside
            self.clear_marker("a reload is needed")
            return Outcome.RELOAD
        if owed := self.owed_modules():  # a predecessor died after unloading
            self.log.warning("modules.owed", modules=owed,
                             why="a previous run was killed after unloading them for its swap")
            self.step_reload_aux()
        return Outcome.NO_RELOAD

    def step_snapshot(self: Runner) -> Outcome:
        untouched = "the driver swap is not started, nothing was touched"
        self.require_saved(untouched)
        snap = take_snapshot(self.node.paths, self.node.netlink)
        pending = self.journal.facts.get("restore_pending")
        kept = self.pending_snapshot() if pending else None
        if kept is not None:  # VFs a previous restore did not bring back keep their saved state
            done = set(self.journal.facts.get("restored_vfs") or [])
            snap, carried = merge_pending(snap, kept, done)
            self.log.warning("snapshot.merged", carried=carried, taken_at=kept.taken_at,
                             why="a restore from the previous snapshot had not completed: its "
                                 "unrestored VFs keep their saved settings, the others are "
                                 "taken as they are now")
        if problem := snapshot_problem(snap):  # what the restore would read back, checked now
            raise StepFailed(f"the VFs' state cannot be saved for a restore ({problem}); "
                             f"{untouched}; check that PF in sysfs (ls -l /sys/bus/pci/devices/"
                             "PCI/) and report the value")
        path = save_snapshot(self.journal.dir, snap)
        if not self.journal.commit(restore_pending=True, restored_vfs=[],
                                   snapshot={"pfs": len(snap.pfs), "vfs": snap.vf_count,
                                             "taken_at": snap.taken_at}):
            self.require_saved(untouched)
        self.log.info("snapshot.saved", path=str(path), pfs=len(snap.pfs), vfs=snap.vf_count,
                      per_pf={p.pci: p.numvfs for p in snap.pfs})
        return Outcome.OK

    def step_preflight(self: Runner) -> Outcome:
        # A watching peermem loader unloads nvidia_peermem once the marker is gone (cleared at
        # startup): give it its budget, then decide on fresh module facts (presence.py).
        if wait_for_peermem_unload(self.node.paths, self.config, self.stop, self.log):
            self.facts = read_module_facts(self.node.paths)
        self.preflight = plan(self.facts, self.config)
        self.journal.set(preflight=self.preflight.to_json())
        if self.preflight.refused:
            reason = "; ".join(self.preflight.refusals) or self.preflight.refused
            self.journal.set(reason=reason)
            self.log.error("reload.refused", reason=reason, refusals=len(self.preflight.refusals),
                           recheck_in_s=self.config.recheck_interval_s,
                           next="the node is untouched; fix the reason and the daemon proceeds at "
                                "its next re-check")
            return Outcome.REFUSED
        self.journal.set(reason=None)
        self.log.info("preflight.ok", unload=list(self.preflight.unload),
                      reload_after=list(self.preflight.reload_after))
        return Outcome.OK

    def step_blacklist(self: Runner) -> Outcome:
        if not self.journal.commit(blacklist_written=True):
            self.require_saved("the blacklist is not written, nothing was touched")
        saved = write_blacklist(self.blacklist_path, self.config.blacklist_modules,
                                self.journal.dir)
        self.log.info("blacklist.written", path=str(self.blacklist_path),
                      modules=list(self.config.blacklist_modules), user_file_saved=saved)
        return Outcome.OK

    def step_unload_aux(self: Runner) -> Outcome:
        assert self.preflight is not None
        # written before the first unload: whatever happens next (even SIGKILL: a killed
        # predecessor's list is kept), these are loaded back
        # openibd unloads the stack itself: what of it was loaded is owed back too unless openibd
        # completes (a failed or killed openibd can leave it unloaded, with every VF gone); a
        # completed openibd's choice (IPOIB_LOAD=no...) is left alone
        stack = [m for m in compared_modules(self.config) if m in self.facts]
        owed = list(self.journal.facts.get("unloaded_for_swap") or [])
        if not self.journal.commit(
                unloaded_for_swap=list(dict.fromkeys([*self.preflight.reload_after, *owed])),
                stack_owed=list(dict.fromkeys([*stack, *self.journal.facts.get("stack_owed",
                                                                               [])])),
                not_reloaded=[]):
            self.require_saved("no module is unloaded")
        deadline = ToolDeadline(self.config)  # however many holders, and however slow
        for name in self.preflight.unload:
            try:
                timeout = deadline.timeout(f"modprobe -r {name}")
            except BudgetSpent as e:
                raise StepFailed(f"{e}; {name} and the holders after it stay loaded") from None
            modprobe_remove([name], self.node.env, timeout)
        return Outcome.OK

    def step_reload(self: Runner) -> Outcome:
        self.journal.set(reloaded_by_us=True, reloaded_this_run=True)
        openibd = str(self.node.paths.resolve("/etc/init.d/openibd"))
        attempts = self.config.openibd_attempts
        try:
            for attempt in Retrying(stop=stop_after_attempt(attempts), wait=wait_fixed(1),
                                    retry=retry_if_exception_type((OpenibdFailed, CommandTimeout)),
                                    sleep=self.sleep):
                with attempt:
                    n = attempt.retry_state.attempt_number
                    self.log.info("openibd.restart", attempt=n, of=attempts,
                                  timeout_s=self.config.openibd_timeout_s)
                    r = run_command([openibd, "restart"], timeout_s=self.config.openibd_timeout_s,
                                    env=self.node.env, what="reload the NIC driver")
                    if not r.ok:
                        raise OpenibdFailed(f"openibd restart exited {r.returncode}: "
                                            f"{(r.stderr or r.stdout).strip()[-300:]}")
            self.journal.set(stack_owed=[])  # openibd loaded the stack it is configured to
        except RetryError as e:
            cause = e.last_attempt.exception()
            raise StepFailed(f"the driver reload failed {attempts} times ({cause}); check what "
                             "holds the modules (lsmod) and the openibd output above") from None
        return Outcome.OK

    def step_reload_aux(self: Runner) -> Outcome:
        """Load back every module unloaded for the swap, on success and on failure alike, plus
        the NFS/NVMe RDMA ULPs with ENABLE_NFSRDMA; name whatever could not be loaded."""
        owed = self.owed_modules()
        names = [*owed, *(NFSRDMA_COMPARED if self.config.enable_nfsrdma else ())]
        loaded = read_module_facts(self.node.paths)
        stack = set(self.journal.facts.get("stack_owed") or [])
        deadline = ToolDeadline(self.config)  # hanging modprobes cannot stretch a stop
        untried: list[str] = []
        for name in dict.fromkeys(names):
            if name in loaded:  # openibd loaded it back (or a dependency did): nothing to do
                continue
            try:
                self.load_back(name, deadline)
            except BudgetSpent:
                untried += [name] if name in owed else []
                continue
            except ModuleCommandError as e:  # the NIC driver may be fine; say what is missing
                if name in owed:  # an NFSRDMA ULP that is not installed is no loss
                    self.log.error("module.reload_failed", module=name, error=str(e),
                                   next=f"load it by hand: modprobe {name}")
                continue
            loaded = read_module_facts(self.node.paths)  # its dependencies came with it
            if name in loaded:
                self.log.warning("module.loaded_back", module=name,
                                 why="unloaded for the swap and not loaded again by openibd"
                                 if name in owed else "ENABLE_NFSRDMA=true")
        missing = sorted(m for m in owed if m not in loaded)  # checked, not assumed
        for name in missing:
            self.log.error("module.not_loaded_back", module=name,
                           why="not tried: the step's tool budget was spent" if name in untried
                           else "its modprobe failed (above)",
                           next=f"load it by hand: modprobe {name}; check dmesg")
        # the ones never tried stay owed, as what they were: the next start tries them again
        self.journal.set(not_reloaded=missing,
                         unloaded_for_swap=[m for m in untried if m not in stack],
                         stack_owed=[m for m in untried if m in stack])
        return Outcome.OK

    def load_back(self: Runner, name: str, deadline: ToolDeadline) -> None:
        """modprobe NAME from the installed driver's tree; if that build does not fit the stack
        loaded now (a swap that failed before openibd unloaded the old stack), from the host's
        tree (`modprobe -d /host`), where the modules that were loaded before came from."""
        try:
            modprobe([name], self.node.env, deadline.timeout(f"modprobe {name}"))
            return
        except ModuleCommandError as e:
            host = self.node.paths.resolve("/host")
            # a modprobe that hung (killed: no exit code) is not a build that does not fit
            if e.returncode is None or not (host / "lib" / "modules").is_dir():
                raise
        modprobe([name], self.node.env, deadline.timeout(f"modprobe -d {host} {name}"),
                 dirname=host)
        self.log.info("module.loaded_from_host", module=name, tree=str(host),
                      why="the installed driver's build does not fit the stack loaded now")

    def owed_modules(self: Runner) -> list[str]:
        """Modules the swap unloaded and must load back: the holders and aux modules, and the
        stack modules that were loaded before it while openibd has not completed."""
        facts = self.journal.facts
        return list(dict.fromkeys([*(facts.get("stack_owed") or []),
                                   *(facts.get("unloaded_for_swap") or [])]))

    def step_unblacklist(self: Runner) -> Outcome:
        done = remove_blacklist(self.blacklist_path, self.journal.dir)
        if done in ("removed", "restored"):
            self.log.info("blacklist.removed", path=str(self.blacklist_path),
                          user_file=done == "restored")
        self.journal.set(blacklist_written=False)
        # a failed swap goes on to the restore too: the VFs come back if the driver did
        return Outcome.OK

    def step_mount_headers(self: Runner) -> Outcome:
        target = self.node.paths.resolve(self.config.shared_kernel_headers_dir)
        target.mkdir(parents=True, exist_ok=True)
        if target.is_mount():
            return Outcome.OK
        r = run_command(["mount", "--rbind", "/usr/src", str(target)], env=self.node.env,
                        timeout_s=self.config.tool_timeout_s,
                        what="share the kernel headers with the GPU side")
        if not r.ok:  # the NIC driver is ready regardless; the GPU side needs them to build peermem
            self.log.error("headers.mount_failed", target=str(target), stderr=r.stderr.strip(),
                           next="nvidia-peermem cannot be built on this node until /usr/src is "
                                f"shared at {target}")
        return Outcome.OK

    def step_ready(self: Runner) -> Outcome:
        # reported only now: a swap under way was finished and the VFs restored first
        self.require_saved("the node is not marked ready while a restart could not resume from "
                           "what it did", starting=False)
        modules = compared_modules(self.config)
        now = decide(loaded_srcversions(self.node.paths, modules), self.installed, modules,
                     present=set(read_module_facts(self.node.paths)))
        if now.reload:
            raise StepFailed("the loaded driver is not the installed one: " + now.explain())
        marker: dict[str, Any] = {
            "driver_version": self.config.driver_version,
            "srcversions": now.loaded_srcversions,
            "reloaded": bool(self.journal.facts.get("reloaded_this_run")),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pid": self.pid,
        }
        if now.to_load:
            self.log.warning("modules.not_loaded", modules=list(now.to_load),
                             why="installed but not loaded; not a reason to reload",
                             next="load them by hand (modprobe NAME) if this node needs them")
        atomic_write_text(self.marker_path, json.dumps(marker) + "\n")  # replaced, never absent
        self.log.info("marker.set", path=str(self.marker_path), **marker)
        return Outcome.OK

    def clear_marker(self: Runner, why: str) -> None:
        if remove_file(self.marker_path):
            self.log.info("marker.cleared", path=str(self.marker_path), why=why)
