"""The RDMA shared device plugin's configuration (`config.json`), checked against this node: pure.

What broke RDMA for days in the field: a file that is not JSON, a resource whose selectors are all
empty (it selects nothing, or everything), selectors naming RDMA devices `mlx5_N` where netdev
names are expected (those names change with probe order), and selectors that match no device on
this node.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MLX5_RDMA_NAME = re.compile(r"^mlx5_\d+$")
SELECTOR_KEYS = ("vendors", "deviceIDs", "drivers", "ifNames", "linkTypes")


@dataclass(frozen=True)
class Device:
    """A ConnectX function of this node as the plugin's selectors see it."""

    pci: str
    vendor: str  # "15b3"
    device: str  # "101d"
    driver: str | None
    netdevs: tuple[str, ...]
    link_type: str  # "ether" | "infiniband"
    pf: bool = True


@dataclass(frozen=True)
class Problem:
    id: str  # rdma-dp-config-invalid | rdma-dp-no-match
    subject: str
    value: str
    fix: str


def _matches(sel: dict[str, Any], d: Device) -> bool:
    def ok(key: str, have: list[str]) -> bool:
        want = [str(v).lower().removeprefix("0x") for v in sel.get(key) or []]
        return not want or any(h.lower() in want for h in have)

    return (ok("vendors", [d.vendor]) and ok("deviceIDs", [d.device])
            and ok("drivers", [d.driver or ""]) and ok("ifNames", list(d.netdevs))
            and ok("linkTypes", [d.link_type]))


def check(text: str, devices: list[Device]) -> list[Problem]:
    """Every problem of the configuration `text` on a node with `devices`."""
    fix_json = ("fix the JSON of the rdma-shared-device-plugin ConfigMap (`jq . config.json` shows "
                "where), then restart the plugin's pods")
    try:
        doc = json.loads(text)
    except ValueError as e:
        return [Problem("rdma-dp-config-invalid", "config.json", f"not valid JSON: {e}", fix_json)]
    resources = doc.get("configList") if isinstance(doc, dict) else None
    if not isinstance(resources, list) or not resources:
        return [Problem("rdma-dp-config-invalid", "config.json", "no configList (a list of "
                        "resources)", "give the ConfigMap a configList: [{resourceName, rdmaHcaMax,"
                        " selectors: {vendors: [\"15b3\"], ifNames: [...]}}]")]
    out: list[Problem] = []
    for i, res in enumerate(resources):
        name = str(res.get("resourceName") or f"configList[{i}]") if isinstance(res, dict) \
            else f"configList[{i}]"
        sel = res.get("selectors") if isinstance(res, dict) else None
        if not isinstance(sel, dict) or not any(sel.get(k) for k in SELECTOR_KEYS):
            out.append(Problem("rdma-dp-config-invalid", name, f"selectors: {json.dumps(sel)}",
                               f"give resource {name} at least one selector, e.g. "
                               "{\"vendors\": [\"15b3\"], \"ifNames\": [\"<PF netdev>\"]}"))
            continue
        rdma_names = [n for n in sel.get("ifNames") or [] if MLX5_RDMA_NAME.match(str(n))]
        if rdma_names:
            out.append(Problem("rdma-dp-config-invalid", name,
                               f"ifNames: {json.dumps(rdma_names)}",
                               "ifNames takes netdev names (ip link), not RDMA device names "
                               "(mlx5_N follows probe order and changes across reboots): use "
                               "the PF netdevs, e.g. " + json.dumps(
                                   sorted({n for d in devices if d.pf for n in d.netdevs})[:2])))
            continue
        if not any(_matches(sel, d) for d in devices):
            out.append(Problem("rdma-dp-no-match", name, f"selectors: {json.dumps(sel)}",
                               f"no ConnectX device of this node matches resource {name}'s "
                               "selectors: compare them with `lspci -nn -d 15b3:` and `ip -br "
                               "link`"))
    return out
