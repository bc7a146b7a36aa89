"""The `provision` state: put the driver onto the node before anything decides on it.

`run precompiled`: the driver is in the image, nothing to do. `run sources`: the inventory's entry
for this kernel, version and build configuration is installed as it is when it checks out (a
warm cache: no build); otherwise the driver is built (here with install.pl, or by the DTK
sidecar) into the inventory and installed. The node itself is not touched here: a failed build
leaves its modules, VFs and files as they were, and the state is retried at the next re-check.

Also here: the host's inbox dependencies preloaded before the reload (`modprobe -d /host`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..host.commands import CommandStopped
from ..host.modules import ModuleCommandError, modprobe, read_module_facts
from ..provision.dtk import (
    DtkStopped,
    build_under_way,
    done_for_this_build,
    prepare,
    shared_dir_for,
    wait_for_build,
)
from ..provision.inventory import (
    Inventory,
    ProvisionError,
    find_packages,
    install_packages,
    kernel_release,
    package_family,
)
from ..provision.plan import BuildSpec, Mode, sanitise_kernel
from ..provision.sources import build_locally
from .budget import BudgetSpent, ToolDeadline
from .decide import CORE
from .errors import StepFailed
from .machine import Outcome

if TYPE_CHECKING:
    from pathlib import Path

    from .runner import Runner

# not ours to preload: what the driver's own packages install (updates/, mlnx-ofa_kernel)
OWN_TREES = ("/updates/", "/weak-updates/", "/extra/mlnx-ofa_kernel/")


def build_spec(r: Runner) -> BuildSpec:
    c = r.config
    return BuildSpec(kernel=kernel_release(r.node.paths), version=c.driver_version,
                     append_flags=c.append_driver_build_flags, enable_nfsrdma=c.enable_nfsrdma)


def step_provision(r: Runner) -> Outcome:
    if r.mode is Mode.PRECOMPILED:
        r.journal.set(provision={"mode": "precompiled", "builds": 0, "cache_hit": None})
        return Outcome.OK
    try:
        spec = build_spec(r)
        if r.provisioned == spec:  # installed by this process already (a re-check after a
            return Outcome.OK      # later step failed): nothing changed since
        return _provision(r, spec)
    except (CommandStopped, DtkStopped) as e:
        r.log.warning("provision.stopped", why=str(e), next="nothing on the node was touched; "
                      "the next start builds again (or takes the cache)")
        return Outcome.FAILED  # the stop request makes it `stopping` (exit 0)
    except ProvisionError as e:
        raise StepFailed(f"{e}; the node is untouched (no module, VF or file changed)") from None


def _provision(r: Runner, spec: BuildSpec) -> Outcome:
    c, paths = r.config, r.node.paths
    family = package_family(paths)
    mode = "dtk" if c.dtk_ocp_driver_build else "sources"
    inv = Inventory(paths.resolve(c.inventory_path), spec) if c.inventory_path else None
    if inv is not None:
        removed, left = inv.clean()
        if removed:
            r.log.info("inventory.cleaned", removed=removed, kept=str(inv.entry))
        if left:
            r.log.warning("inventory.not_ours", left=left, root=str(inv.root),
                          why="not shaped like a build cache's entries: left alone",
                          next="check NVIDIA_NIC_DRIVERS_INVENTORY_PATH points at the cache")
    problem = inv.problem() if inv is not None else "NVIDIA_NIC_DRIVERS_INVENTORY_PATH is " \
        "empty: no build cache, every start builds"
    info: dict[str, Any] = dict(r.journal.facts.get("provision") or {})
    info.update(mode=mode, kernel=spec.kernel, fingerprint=spec.digest(),
                builds=int(info.get("builds") or 0) if info.get("kernel") == spec.kernel else 0)
    started = time.monotonic()
    if problem is None:
        assert inv is not None
        r.log.info("inventory.hit", entry=str(inv.entry), packages=len(inv.packages()),
                   why="built before for this kernel, version and configuration: no build")
        packages, info["cache_hit"] = inv.packages(), True
    else:
        r.log.info("build.needed", kernel=spec.kernel, version=spec.version, why=problem)
        info.update(cache_hit=False, builds=info["builds"] + 1, build_started_at=time.time())
        r.journal.set(provision=info)
        packages = _build_dtk(r, spec, info) if mode == "dtk" else build_locally(
            paths, paths.resolve(c.driver_path), spec.kernel, spec.append_flags,
            r.node.commands, log_path=r.journal.dir / "build.log",
            timeout_s=c.build_timeout_s, progress_s=c.build_progress_s, stop=r.stop,
            nfsrdma=c.enable_nfsrdma, family=family)
        if inv is not None:
            inv.store(packages)
            packages = inv.packages()
            r.log.info("inventory.stored", entry=str(inv.entry), packages=len(packages))
    install_packages(packages, family, spec.kernel, r.node.commands, c.tool_timeout_s)
    info.update(installed_at=time.time(), install_s=round(time.monotonic() - started, 3))
    r.journal.set(provision=info)
    r.provisioned = spec
    r.log.info("provision.done", mode=mode, cache_hit=info["cache_hit"], builds=info["builds"],
               packages=[p.name for p in packages])
    return Outcome.OK


def _build_dtk(r: Runner, spec: BuildSpec, info: dict[str, Any]) -> list[Path]:
    c, paths = r.config, r.node.paths
    shared = shared_dir_for(paths.resolve(c.dtk_shared_dir), sanitise_kernel(spec.kernel))
    built = shared / f"MLNX_OFED_SRC-{spec.version}"
    if done_for_this_build(shared, spec) and find_packages(built):
        r.log.info("dtk.already_built", shared_dir=str(shared),
                   why="the done flag for this version and configuration is there")
        return find_packages(built)
    if build_under_way(shared, spec):  # this container restarted while the sidecar builds
        r.log.info("dtk.build_under_way", shared_dir=str(shared),
                   why="the sidecar is building this very build: waiting for it, not "
                       "preparing again under its feet")
    else:  # (a done flag without packages is a build that was interrupted: done again)
        # the sidecar's build ends before our wait does, so that its failure is reported
        sidecar_timeout = min(c.build_timeout_s, 0.95 * c.dtk_build_timeout_s)
        prepare(shared, paths.resolve(c.driver_path), spec, heartbeat_s=c.heartbeat_interval_s,
                build_timeout_s=sidecar_timeout)  # False: its build is under way: waited for
    info["dtk_noticed_at"] = wait_for_build(
        shared, spec, timeout_s=c.dtk_build_timeout_s, heartbeat_s=c.heartbeat_interval_s,
        progress_s=c.build_progress_s, stop=r.stop)
    packages = find_packages(built)
    if not packages:
        raise ProvisionError(f"the DTK sidecar's done flag is there but no package is under "
                             f"{built}/RPMS or DEBS: see its log (dtk_build.log there)")
    return packages


def preload_host_dependencies(r: Runner, deadline: ToolDeadline) -> None:
    """Before the reload: the installed stack's dependencies that are not the driver's own
    (the host's inbox modules, e.g. psample, tls, pci-hyperv-intf) are loaded from the host's
    module tree (`modprobe -d /host`), as upstream does, so that the new stack's load cannot fail
    on a module the container's tree lacks. A failure is logged, never fatal: openibd names it."""
    host = r.node.paths.resolve("/host")
    if not (host / "lib" / "modules").is_dir():
        return
    loaded = read_module_facts(r.node.paths)
    wanted: list[str] = []
    for name in CORE:
        res = r.node.commands.run(["modinfo", "-F", "depends", name],
                                  timeout_s=deadline.timeout(f"modinfo {name}"),
                                  what="list the installed driver's dependencies")
        wanted += [d.strip() for d in res.stdout.split(",") if res.ok and d.strip()]
    for dep in dict.fromkeys(wanted):
        if dep.replace("-", "_") in loaded:
            continue
        res = r.node.commands.run(["modinfo", "-b", str(host), "-F", "filename", dep],
                                  timeout_s=deadline.timeout(f"modinfo {dep}"),
                                  what="where the host's copy of a dependency is")
        if not res.ok or not res.stdout.strip() or any(t in res.stdout for t in OWN_TREES):
            continue  # not in the host's tree, or the driver's own module: openibd loads it
        try:
            modprobe([dep], r.node.commands, deadline.timeout(f"modprobe -d {host} {dep}"),
                     dirname=host)
            r.log.info("dependency.preloaded", module=dep, tree=str(host))
        except (ModuleCommandError, BudgetSpent) as e:
            r.log.warning("dependency.not_preloaded", module=dep, error=str(e),
                          next="openibd loads it if it can; if the reload fails, load it by "
                               f"hand: modprobe -d /host {dep}")
