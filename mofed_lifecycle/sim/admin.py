"""`sim set-vf`: what an administrator's `ip link set PF vf N ...` does on a simulated node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .client import KernelClient, SimKernelError

INT_KEYS = ("vlan", "qos", "min_tx_rate", "max_tx_rate")
BOOL_KEYS = ("trust", "spoofchk")
STR_KEYS = ("mac", "node_guid", "port_guid", "link_state")
BOOLS = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


class AdminError(ValueError):
    """A KEY=VALUE the contract does not define, or a PF/VF the node does not have."""


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE words -> the VF change, typed: `vlan=900 trust=off mac=02:...`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise AdminError(f"{pair!r}: expected KEY=VALUE")
        if key in INT_KEYS:
            if not value.isdigit():
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
            raise AdminError(f"the kernel refused it: {e.strerror}") from None
        return dict(k.call("state")["pfs"][pf_pci.lower()]["vfs"][str(index)])
