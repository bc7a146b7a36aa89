"""`sim set-vf` and `sim set`: change a simulated node as an administrator or a failure would.

`set-vf` is what `ip link set PF vf N ...` does; `set` unloads or loads a module, moves the default
route, or changes a PF's firmware VF count for the next boot. Each acts at once on the running node
(its kernel process), between or during runs; a kernel refusal is reported as the kernel's reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .client import KernelClient
from .errors import SimKernelError
from .scenario import NAME_RE
from .scenario_host import FW_MAX_VFS

INT_KEYS = ("vlan", "qos", "min_tx_rate", "max_tx_rate")
BOOL_KEYS = ("trust", "spoofchk")
STR_KEYS = ("mac", "node_guid", "port_guid", "link_state")
BOOLS = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


class AdminError(ValueError):
    """A KEY=VALUE the contract does not define, or a PF/VF the node does not have (exit 2)."""


class AdminRefused(RuntimeError):
    """The node's kernel refused the change (a module in use, ...): exit 1, with its reason."""


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE words -> the VF change, typed: `vlan=900 trust=off mac=02:...`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise AdminError(f"{pair!r}: expected KEY=VALUE")
        if key in INT_KEYS:
            if not (value.isascii() and value.isdigit()):
                raise AdminError(f"{key}={value}: expected a non-negative integer")
            out[key] = int(value)
        elif key in BOOL_KEYS:
            if value.lower() not in BOOLS:
                raise AdminError(f"{key}={value}: expected on or off")
            out[key] = BOOLS[value.lower()]
        elif key in STR_KEYS:
            out[key] = value.lower()
        else:
            raise AdminError(f"unknown VF setting {key!r} (known: "
                             f"{', '.join((*STR_KEYS, *INT_KEYS, *BOOL_KEYS))})")
    if not out:
        raise AdminError("give at least one KEY=VALUE")
    return out


def set_vf(root: Path, pf_pci: str, index: int, pairs: list[str]) -> dict[str, Any]:
    """Apply the settings through the PF, as netlink would; returns the VF's ground truth."""
    change = parse_settings(pairs)
    with KernelClient(root) as k:
        pfs = k.call("state")["pfs"]
        pf = pfs.get(pf_pci.lower())
        if pf is None:
            raise AdminError(f"no PF {pf_pci} on this node (PFs: {', '.join(sorted(pfs))})")
        try:
            k.call("nl_set_vf", pf=pf["name"], vf=index, change=change)
        except SimKernelError as e:
            raise AdminRefused(f"the kernel refused it: {e.strerror}") from None
        return dict(k.call("state")["pfs"][pf_pci.lower()]["vfs"][str(index)])


SET_ACTIONS = {  # WHAT -> (arguments, what it does)
    "module-unload": ("NAME", "rmmod NAME (refused while it is in use)"),
    "module-load": ("NAME", "modprobe NAME, with its dependencies"),
    "route-default": ("DEV", "the default route through netdev DEV ('none': no default route)"),
    "fw": ("PF_PCI next_boot_numvfs=N", "firmware NUM_OF_VFS for the next cold boot"),
    "iommu": ("MODE", "passthrough|translated|off: the IOMMU groups, command line and boot log "
                      "as after a reboot with it"),
}


def set_iommu(root: Path, mode: str) -> dict[str, Any]:
    """The node rebooted with another IOMMU mode: only files change (what `doctor` reads)."""
    import dataclasses
    import shutil

    from .scenario_host import IOMMU_MODES
    from .scenario_parse import load_scenario
    from .tree import PCI_PARENT
    from .tree_host import render_host

    if mode not in IOMMU_MODES:
        raise AdminError(f"iommu {mode!r}: one of {', '.join(IOMMU_MODES)}")
    sc = load_scenario(root / ".sim" / "scenario.toml")
    shutil.rmtree(root / "sys/kernel/iommu_groups", ignore_errors=True)
    render_host(root, dataclasses.replace(sc, host=dataclasses.replace(sc.host, iommu=mode)),
                PCI_PARENT)
    return {"changed": "iommu", "iommu": mode}


def set_node(root: Path, words: list[str]) -> dict[str, Any]:
    """`sim set WHAT ARGS`: one change, at once; returns {"changed": WHAT, ...the new facts}."""
    if not words or words[0] not in SET_ACTIONS:
        raise AdminError(f"unknown change {words[0] if words else ''!r}; one of: " + "; ".join(
            f"{w} {a}" for w, (a, _) in SET_ACTIONS.items()))
    what, args = words[0], words[1:]
    expected = SET_ACTIONS[what][0]
    if len(args) != len(expected.split()):
        raise AdminError(f"usage: sim set --root DIR {what} {expected}")
    if what == "iommu":
        return set_iommu(root, args[0])
    with KernelClient(root) as k:
        try:
            if what == "module-unload":
                k.call("rmmod", name=args[0])
                return {"changed": what, "module": args[0],
                        "loaded": args[0].replace("-", "_") in k.call("state")["modules"]}
            if what == "module-load":
                loaded = k.call("modprobe", names=[args[0]])
                return {"changed": what, "module": args[0], "loaded_now": loaded}
            if what == "route-default":
                if args[0] != "none" and not NAME_RE.match(args[0]):
                    raise AdminError(f"{args[0]!r}: invalid interface name")
                k.call("set_default_route", dev=None if args[0] == "none" else args[0])
                return {"changed": what, "default_route": k.call("state")["default_route"]}
            pfs = k.call("state")["pfs"]
            if args[0].lower() not in pfs:
                raise AdminError(f"no PF {args[0]} on this node (PFs: {', '.join(sorted(pfs))})")
            key, sep, value = args[1].partition("=")
            if key != "next_boot_numvfs" or not sep or not (value.isascii() and value.isdigit()):
                raise AdminError(f"{args[1]!r}: expected next_boot_numvfs=N")
            if int(value) > FW_MAX_VFS:
                raise AdminError(f"next_boot_numvfs={value}: the firmware takes 0..{FW_MAX_VFS}")
            k.call("set_fw", pf=args[0].lower(), next_boot_num_of_vfs=int(value))
            return {"changed": what, "pf": args[0].lower(),
                    "fw": k.call("state")["pfs"][args[0].lower()]["fw"]}
        except SimKernelError as e:
            raise AdminRefused(f"{what} {' '.join(args)}: the kernel refused it: "
                               f"{e.strerror}") from None
