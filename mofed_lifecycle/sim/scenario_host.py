"""The node around the NIC driver in a scenario (contract version 2): `[host]` and `[[pf]] fw`.

`[host]` is what an operator's node holds beside the NIC: IOMMU mode, GPUs, the default route (the
management uplink) and its addresses; `fw` is a PF's firmware configuration (mstconfig's NVRAM):
the VF count now and at the next cold boot, SR-IOV enabled. Validated here, key by key, with
errors that name the file and the key, as the rest of the scenario.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from .scenario import NAME_RE, BuildSpec, FwSpec, HostSpec, ScenarioError

IOMMU_MODES = ("passthrough", "translated", "off")
HOST_KEYS = frozenset({"iommu", "gpus", "default_route", "uplink_addresses"})
FW_KEYS = frozenset({"num_of_vfs", "next_boot_num_of_vfs", "sriov_en"})
FW_MAX_VFS = 255  # what ConnectX firmware accepts for NUM_OF_VFS


def _unknown(where: str, raw: dict[str, Any], known: frozenset[str], table: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r} in {table} (known: "
                            f"{', '.join(sorted(known))})")


def _int(where: str, key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ScenarioError(f"{where}.{key}: expected an integer {lo}..{hi}, got {v!r}")
    return v


def parse_host(where: str, raw: Any) -> HostSpec:
    if raw is None:
        return HostSpec()
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a table, got {type(raw).__name__}")
    _unknown(where, raw, HOST_KEYS, "[host]")
    iommu = raw.get("iommu", "passthrough")
    if iommu not in IOMMU_MODES:
        raise ScenarioError(f"{where}.iommu: one of {', '.join(IOMMU_MODES)}, got {iommu!r}")
    route = raw.get("default_route")
    if route is not None and not (isinstance(route, str) and NAME_RE.match(route)):
        raise ScenarioError(f"{where}.default_route: a netdev name, got {route!r}")
    addresses = raw.get("uplink_addresses", [])
    if not isinstance(addresses, list):
        raise ScenarioError(f"{where}.uplink_addresses: expected a list, got {addresses!r}")
    for a in addresses:
        try:
            ipaddress.ip_interface(a)
        except (TypeError, ValueError):
            raise ScenarioError(f"{where}.uplink_addresses: {a!r} is not an address/prefix "
                                "such as 10.0.0.7/24") from None
    if addresses and route is None:
        raise ScenarioError(f"{where}.uplink_addresses: needs default_route (the netdev they "
                            "are on)")
    return HostSpec(iommu=iommu, gpus=_int(where, "gpus", raw.get("gpus", 0), 0, 64),
                    default_route=route, uplink_addresses=tuple(addresses))


def parse_fw(where: str, raw: Any, numvfs: int, totalvfs: int) -> FwSpec:
    """A PF's firmware; by default it allows `totalvfs` VFs now and at the next boot."""
    if raw is None:
        return FwSpec(num_of_vfs=totalvfs, next_boot_num_of_vfs=totalvfs)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected an inline table, got {type(raw).__name__}")
    _unknown(where, raw, FW_KEYS, "fw")
    now = _int(where, "num_of_vfs", raw.get("num_of_vfs", totalvfs), 0, FW_MAX_VFS)
    sriov = raw.get("sriov_en", True)
    if not isinstance(sriov, bool):
        raise ScenarioError(f"{where}.sriov_en: expected true or false, got {sriov!r}")
    if numvfs > (now if sriov else 0):
        raise ScenarioError(f"{where}: numvfs = {numvfs} but the firmware allows "
                            f"{now if sriov else 0} VFs (num_of_vfs, sriov_en)")
    return FwSpec(num_of_vfs=now, sriov_en=sriov, next_boot_num_of_vfs=_int(
        where, "next_boot_num_of_vfs", raw.get("next_boot_num_of_vfs", now), 0, FW_MAX_VFS))


BUILD_KEYS = frozenset({"mode", "build_s", "build_failures", "cache", "dtk_sidecar_start_s"})
BUILD_MODES = ("precompiled", "sources", "dtk")


def _seconds(where: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 86400:
        raise ScenarioError(f"{where}.{key}: expected seconds from 0 to 86400, got {v!r}")
    return float(v)


def parse_build(where: str, raw: Any) -> BuildSpec:
    """[build]: the driver container's mode, a build's duration and failures, the cache."""
    if raw is None:
        return BuildSpec()
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a table, got {type(raw).__name__}")
    _unknown(where, raw, BUILD_KEYS, "[build]")
    mode = raw.get("mode", "precompiled")
    if mode not in BUILD_MODES:
        raise ScenarioError(f"{where}.mode: expected one of {', '.join(BUILD_MODES)}, got "
                            f"{mode!r}")
    cache = raw.get("cache", "cold")
    if cache not in ("cold", "warm"):
        raise ScenarioError(f"{where}.cache: expected \"cold\" or \"warm\", got {cache!r}")
    return BuildSpec(mode=mode, build_s=_seconds(where, "build_s", raw.get("build_s", 300)),
                     build_failures=_int(where, "build_failures", raw.get("build_failures", 0),
                                         0, 1000),
                     cache=cache,
                     dtk_sidecar_start_s=_seconds(where, "dtk_sidecar_start_s",
                                                  raw.get("dtk_sidecar_start_s", 5)))
