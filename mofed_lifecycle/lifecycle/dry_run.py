"""`run --dry-run`: the decision and the plan from read-only inspection; nothing is touched."""

from __future__ import annotations

from ..config import Config
from ..host.modules import installed_srcversions, loaded_srcversions, read_module_facts
from ..host.node import Node
from ..provision.inventory import Inventory, kernel_release
from ..provision.plan import BuildSpec, Mode
from .budget import ToolDeadline
from .decide import compared_modules, decide
from .preflight import plan


def provision_lines(node: Node, config: Config) -> list[str]:
    """`run sources`: whether the driver would be built, and where (read-only)."""
    spec = BuildSpec(kernel_release(node.paths), config.driver_version,
                     config.append_driver_build_flags, config.enable_nfsrdma)
    where = "by the DTK sidecar" if config.dtk_ocp_driver_build else "here with install.pl"
    if not config.inventory_path:
        return [f"provision: would build the driver {where} (no NVIDIA_NIC_DRIVERS_INVENTORY_PATH:"
                " no cache), install it, then decide as below"]
    inv = Inventory(node.paths.resolve(config.inventory_path), spec)
    problem = inv.problem()
    if problem is None:
        return [f"provision: would install {inv.entry} (the cache matches: no build), then "
                "decide as below"]
    return [f"provision: would build the driver {where}: {problem}; install it, then decide "
            "(the decision below is on the driver installed in the image now, not the build)"]


def dry_run(node: Node, config: Config, mode: Mode = Mode.PRECOMPILED) -> tuple[bool, str]:
    """(would proceed, text): what `run` would do now on this node, and why."""
    head = provision_lines(node, config) if mode is Mode.SOURCES else []
    proceed, text = _decide(node, config)
    return proceed, "\n".join([*head, text])


def _decide(node: Node, config: Config) -> tuple[bool, str]:
    modules = compared_modules(config)
    facts = read_module_facts(node.paths)
    decision = decide(loaded_srcversions(node.paths, modules),
                      installed_srcversions(modules, node.commands, ToolDeadline(config).timeout),
                      modules,
                      present=set(facts))
    lines = [f"decision: {decision.explain()}"]
    if not decision.reload:
        lines.append("would not reload: the installed driver is loaded; would set the readiness "
                     f"marker {config.driver_ready_path} and serve")
        return True, "\n".join(lines)
    pre = plan(facts, config)
    if pre.refused:
        lines.append("would refuse the reload: " + "; ".join(pre.refusals or (pre.refused,)))
        lines.append("would change nothing, stay up not ready, and re-check every "
                     f"{config.recheck_interval_s:g}s")
        return False, "\n".join(lines)
    lines += [
        f"would write the blacklist {config.blacklist_file} "
        f"({', '.join(config.blacklist_modules)})",
        "would unload first: " + (", ".join(pre.unload) or "nothing (no module outside the "
                                                          "driver stack holds it)"),
        f"would run `/etc/init.d/openibd restart` (timeout {config.openibd_timeout_s:g}s, "
        f"{config.openibd_attempts} attempts)",
        "would load again: " + (", ".join(pre.reload_after) or "nothing"),
        f"would remove the blacklist, check the loaded srcversions and set the marker "
        f"{config.driver_ready_path}",
    ]
    return True, "\n".join(lines)
