"""Scenario files (TOML): parsed and validated, every error naming the file and the key.

The data they become, and the rules that derive what a scenario leaves out, are in scenario.py.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .scenario import (
    AUX_DEPS,
    GUID_RE,
    KERNEL_RE,
    LINK_STATES,
    MAC_RE,
    MODULE_RE,
    NAME_RE,
    PCI_RE,
    VF_KEYS,
    Delay,
    GpuSpec,
    PfSpec,
    Scenario,
    ScenarioError,
    VfSpec,
    derived_guid,
    derived_mac,
    vf_pci,
)
from .scenario_host import parse_build, parse_fw, parse_host


class _Reader:
    """Typed access to one TOML table with errors that name the file and key."""

    def __init__(self, where: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ScenarioError(f"{where}: expected a table, got {type(table).__name__}")
        self.where, self.table = where, table

    def fail(self, key: str, msg: str) -> ScenarioError:
        return ScenarioError(f"{self.where}.{key}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...,
            check: Callable[[Any], object] | None = None) -> Any:
        if key not in self.table:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        v = self.table[key]
        if isinstance(v, bool) and kind in (int, float, (int, float)):
            raise self.fail(key, f"expected a number, got {v!r}")
        if not isinstance(v, kind):
            raise self.fail(key, f"expected {getattr(kind, '__name__', kind)}, got {v!r}")
        if check is not None and not check(v):
            raise self.fail(key, f"invalid value {v!r}")
        return v


# Every key the contract defines, per table: anything else is a misspelling, refused by name.
# ([host], [build] and fw: scenario_host.py.)
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"node", "driver", "env", "udev", "pf", "gpu", "host", "build"}),
    "node": frozenset({"name", "kernel", "time_scale", "seed"}),
    "driver": frozenset({"loaded_version", "loaded", "installed_version", "installed",
                         "openibd_restart_s", "openibd_failures", "extra_modules",
                         "aux_loaded"}),
    "udev": frozenset({"netdev_delay_s", "rename", "rename_delay_s", "late_vfs",
                       "probe_parallel", "blacklist_lag_s"}),
    "gpu": frozenset({"peermem_start_s", "peermem_ko", "peermem_loaded", "peermem_users"}),
    "pf": frozenset({"pci", "name", "link", "mtu", "up", "eswitch", "numvfs", "totalvfs",
                     "vf_name", "rep_name", "vf", "fw"}),
    # load_hangs (a simulator extension): `modprobe NAME` never returns (its init blocks, e.g. on
    # an unreachable storage target) until it is killed; the module is not loaded
    "extra_modules": frozenset({"name", "holds", "load_hangs"}),
}


def _check_finite(where: str, data: dict[str, Any]) -> None:
    """No inf or nan anywhere (TOML has them; no time, delay or count can be infinite)."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ScenarioError(f"{where}: {path}: expected a finite number, got {value}")


def check_known_keys(where: str, table: str, raw: Any) -> None:
    """Refuse a key the contract does not define (exit 2 at the CLI), naming it and its table."""
    if not isinstance(raw, dict):
        return
    unknown = sorted(set(raw) - KNOWN_KEYS[table])
    if unknown:
        label = f"[{table}]" if table else "the top level"
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r} in {label} (known: "
                            f"{', '.join(sorted(KNOWN_KEYS[table]))})")


def _delay(r: _Reader, key: str, default: float) -> Delay:
    v = r.table.get(key, default)
    if isinstance(v, bool):
        raise r.fail(key, "expected seconds or a list of seconds")
    if isinstance(v, int | float):
        vals = [float(v)]
    elif isinstance(v, list) and v and all(isinstance(x, int | float) for x in v):
        vals = [float(x) for x in v]
    else:
        raise r.fail(key, f"expected seconds, [lo, hi] or a list per VF index, got {v!r}")
    if any(x < 0 for x in vals):
        raise r.fail(key, "delays cannot be negative")
    if len(vals) == 1:
        return Delay(vals[0], vals[0])
    if len(vals) == 2:
        return Delay(min(vals), max(vals))
    return Delay(min(vals), max(vals), per_index=tuple(vals))


def _modules_map(r: _Reader, key: str) -> dict[str, str]:
    m = r.get(key, dict, {})
    for name, src in m.items():
        if not MODULE_RE.match(name) or not isinstance(src, str) or not src.strip():
            raise r.fail(key, f"module {name!r} needs a srcversion string, got {src!r}")
    return {k.replace("-", "_"): v for k, v in m.items()}


def _vf_settings(where: str, raw: Any) -> dict[str, Any]:
    r = _Reader(where, raw)
    unknown = set(raw) - VF_KEYS
    if unknown:
        known = ", ".join(sorted(VF_KEYS))
        raise r.fail(sorted(unknown)[0], f"unknown VF setting (known: {known})")
    out: dict[str, Any] = {}
    checks = {
        "mac": (str, lambda v: MAC_RE.match(v.lower())),
        "node_guid": (str, lambda v: GUID_RE.match(v.lower())),
        "port_guid": (str, lambda v: GUID_RE.match(v.lower())),
        "vlan": (int, lambda v: 0 <= v <= 4095),
        "qos": (int, lambda v: 0 <= v <= 7),
        "trust": (bool, None),
        "spoofchk": (bool, None),
        "up": (bool, None),
        "link_state": (str, lambda v: v in LINK_STATES),
        "min_tx_rate": (int, lambda v: v >= 0),
        "max_tx_rate": (int, lambda v: v >= 0),
        "mtu": (int, lambda v: 68 <= v <= 9978),
        "driver": (str, lambda v: v in ("mlx5_core", "vfio-pci", "none")),
    }
    for key in raw:
        kind, check = checks[key]
        v = r.get(key, kind, check=check)
        out[key] = v.lower() if key in ("mac", "node_guid", "port_guid") else v
    return out


def _pf(where: str, raw: Any, seed: int, vf_offset: int = 2) -> PfSpec:
    r = _Reader(where, raw)
    pci = r.get("pci", str, check=lambda v: PCI_RE.match(v)).lower()
    name = r.get("name", str, check=lambda v: NAME_RE.match(v))
    link = r.get("link", str, "eth", check=lambda v: v in ("eth", "ib"))
    numvfs = r.get("numvfs", int, 0, check=lambda v: 0 <= v <= 255)
    totalvfs = r.get("totalvfs", int, max(127, numvfs), check=lambda v: v >= numvfs)
    vf_name = r.get("vf_name", str, name + "v{vf}")
    rep_name = r.get("rep_name", str, "{pf}_{vf}")
    for template, key in ((vf_name, "vf_name"), (rep_name, "rep_name")):
        try:
            longest = template.format(vf=max(numvfs - 1, 0), pf=name)
        except (KeyError, IndexError, ValueError) as e:
            raise r.fail(key, f"bad name template {template!r}: use {{vf}} and {{pf}}") from e
        if key == "rep_name" and r.table.get("eswitch") != "switchdev":
            continue
        if not NAME_RE.match(longest):
            raise r.fail(key, f"{longest!r} is not a valid interface name (at most 15 "
                              "characters): choose a shorter template")
    try:
        vf_name.format(vf=0, pf=name)
    except (KeyError, IndexError, ValueError) as e:
        raise r.fail("vf_name", f"bad name template {vf_name!r}: use {{vf}} for the index") from e
    vf_tables = r.get("vf", dict, {})
    common = _vf_settings(f"{where}.vf.all", vf_tables.get("all", {}))
    per_vf: dict[int, dict[str, Any]] = {}
    for key, table in vf_tables.items():
        if key == "all":
            continue
        if not key.isdigit() or int(key) >= max(numvfs, 1):
            raise r.fail(f"vf.{key}", f"no such VF index (numvfs = {numvfs})")
        per_vf[int(key)] = _vf_settings(f"{where}.vf.{key}", table)
    ib = link == "ib"
    vfs = []
    for i in range(numvfs):
        s = {**common, **per_vf.get(i, {})}
        if ib and "mac" in s:
            raise r.fail(f"vf.{i}.mac", "IB VFs have GUIDs, not MACs")
        if not ib and ("node_guid" in s or "port_guid" in s):
            raise r.fail(f"vf.{i}", "Ethernet VFs have no GUIDs")
        p = vf_pci(pci, i, vf_offset)
        vfs.append(
            VfSpec(
                index=i,
                pci=p,
                mac=None if ib else s.get("mac", derived_mac(seed, p, i)),
                node_guid=s.get("node_guid", derived_guid(seed, p, i, "node")) if ib else None,
                port_guid=s.get("port_guid", derived_guid(seed, p, i, "port")) if ib else None,
                mtu=s.get("mtu", 2044 if ib else 1500),
                **{k: v for k, v in s.items() if k not in ("mac", "node_guid", "port_guid", "mtu")},
            )
        )
    return PfSpec(
        pci=pci,
        name=name,
        link=link,
        mtu=r.get("mtu", int, 2044 if ib else 1500, check=lambda v: 68 <= v <= 9978),
        up=r.get("up", bool, True),
        eswitch=r.get("eswitch", str, "legacy", check=lambda v: v in ("legacy", "switchdev")),
        numvfs=numvfs,
        totalvfs=totalvfs,
        vf_name=vf_name,
        rep_name=rep_name,
        mac=derived_mac(seed, pci, "pf"),
        vfs=tuple(vfs),
        vf_offset=vf_offset,
        fw=parse_fw(f"{where}.fw", raw.get("fw"), numvfs, totalvfs),
    )


def _rid(pci: str) -> int:
    _dom, bus, devfn = pci.split(":")
    dev, fn = devfn.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn)


def vf_offsets(pfs: tuple[PfSpec, ...]) -> dict[str, int]:
    """sriov_offset per PF, laid out as ConnectX firmware does for the ports of one adapter.

    The lowest PF function of a device listed has its VFs at its routing ID + 2; each further PF of
    the same device (same domain:bus:dev) starts its VFs right after the previous one's `totalvfs`
    range (a dual-port card with 8 VFs per port: PF .0 -> .2 to 01.1, PF .1 -> 01.2 on).
    """
    groups: dict[str, list[PfSpec]] = {}
    for p in pfs:
        groups.setdefault(p.pci.rsplit(".", 1)[0], []).append(p)
    out: dict[str, int] = {}
    for group in groups.values():
        group.sort(key=lambda p: _rid(p.pci))
        first_vf = _rid(group[0].pci) + 2
        for p in group:
            out[p.pci] = first_vf - _rid(p.pci)
            first_vf += p.totalvfs
    return out


def _check_unique_functions(where: str, pfs: tuple[PfSpec, ...]) -> None:
    """No two PCI functions at one address, no two netdevs with one name (else the node is wrong
    silently: a VF range running into another PF, or a vf_name without {vf})."""
    functions: dict[str, str] = {p.pci: f"PF {p.name}" for p in pfs}
    netdevs: dict[str, str] = {p.name: f"PF {p.pci}" for p in pfs}
    for p in pfs:
        for v in p.vfs:
            what = f"VF {v.index} of PF {p.pci}"
            if v.pci in functions:
                raise ScenarioError(f"{where}: {what} would be at {v.pci}, already "
                                    f"{functions[v.pci]} (VFs are at the PF's routing ID + "
                                    f"{p.vf_offset} + index)")
            functions[v.pci] = what
            name = p.vf_final_name(v.index)
            if name in netdevs:
                raise ScenarioError(f"{where}: {what} would be named {name!r}, already "
                                    f"{netdevs[name]} (check vf_name)")
            netdevs[name] = what


def parse_scenario(text: str, where: str = "scenario") -> Scenario:
    """Parse scenario TOML text; raise ScenarioError naming the offending key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{where}: not valid TOML: {str(e)[:200]}") from None
    except RecursionError:
        raise ScenarioError(f"{where}: arrays or tables nested too deeply") from None
    _check_finite(where, data)
    top = _Reader(where, data)
    check_known_keys(where, "", data)
    for table in ("node", "driver", "udev", "gpu"):
        check_known_keys(where, table, data.get(table))
    for i, pf_raw in enumerate(data.get("pf") or [] if isinstance(data.get("pf"), list) else []):
        check_known_keys(f"{where}: [[pf]] #{i + 1}", "pf", pf_raw)
    node = _Reader(f"{where}: [node]", top.get("node", dict, {}))
    drv = _Reader(f"{where}: [driver]", top.get("driver", dict))
    udev = _Reader(f"{where}: [udev]", top.get("udev", dict, {}))
    seed = node.get("seed", int, 0)
    extra = []
    hanging: set[str] = set()
    for i, em in enumerate(drv.get("extra_modules", list, [])):
        er = _Reader(f"{where}: [driver].extra_modules[{i}]", em)
        check_known_keys(f"{where}: [driver].extra_modules[{i}]", "extra_modules", em)
        holds = er.get("holds", list, [])
        names = [er.get("name", str, check=lambda v: MODULE_RE.match(v)), *holds]
        if not all(isinstance(h, str) and MODULE_RE.match(h) for h in names):
            raise er.fail("holds", f"module names only, got {holds!r}")
        extra.append((names[0].replace("-", "_"), tuple(h.replace("-", "_") for h in holds)))
        if er.get("load_hangs", bool, False):
            hanging.add(extra[-1][0])
    aux = drv.get("aux_loaded", list, [])
    if not all(a in AUX_DEPS for a in aux):
        raise drv.fail("aux_loaded", f"known auxiliary modules: {', '.join(AUX_DEPS)}")
    late = udev.get("late_vfs", dict, {})
    if not all(k.isdigit() and isinstance(v, int | float) and v >= 0 for k, v in late.items()):
        raise udev.fail("late_vfs", "expected { <vf index> = <seconds> }")
    env = top.get("env", dict, {})
    if not all(isinstance(v, str) for v in env.values()):
        raise top.fail("env", "every value must be a string, as in a container's environment")
    gpu_raw = data.get("gpu")
    gpu = None
    if gpu_raw is not None:
        g = _Reader(f"{where}: [gpu]", gpu_raw)
        gpu = GpuSpec(
            peermem_start_s=float(g.get("peermem_start_s", (int, float), 0.0)),
            peermem_ko=g.get("peermem_ko", str, "matching",
                             check=lambda v: v in ("matching", "stub", "stale")),
            peermem_loaded=g.get("peermem_loaded", bool, False),
            peermem_users=g.get("peermem_users", int, 0, check=lambda v: v >= 0),
        )
    pfs_raw = top.get("pf", list, [])
    pfs = tuple(_pf(f"{where}: [[pf]] #{i + 1}", p, seed) for i, p in enumerate(pfs_raw))
    for attr in ("pci", "name"):
        seen = [getattr(p, attr) for p in pfs]
        if len(seen) != len(set(seen)):
            raise ScenarioError(f"{where}: two [[pf]] share a {attr}")
    offsets = vf_offsets(pfs)
    pfs = tuple(
        pf if offsets[pf.pci] == pf.vf_offset
        else _pf(f"{where}: [[pf]] #{i + 1}", pfs_raw[i], seed, offsets[pf.pci])
        for i, pf in enumerate(pfs)
    )
    _check_unique_functions(where, pfs)
    return Scenario(
        name=node.get("name", str, Path(where).stem or "node"),
        kernel=node.get("kernel", str, "5.15.0-generic", check=lambda v: KERNEL_RE.match(v)),
        time_scale=float(node.get("time_scale", (int, float), 1.0, check=lambda v: v > 0)),
        seed=seed,
        loaded_version=drv.get("loaded_version", str),
        installed_version=drv.get("installed_version", str),
        loaded=_modules_map(drv, "loaded"),
        installed=_modules_map(drv, "installed"),
        openibd_restart_s=float(drv.get("openibd_restart_s", (int, float), 120.0,
                                        check=lambda v: v >= 0)),
        openibd_failures=drv.get("openibd_failures", int, 0, check=lambda v: v >= 0),
        extra_modules=tuple(extra),
        hanging_loads=frozenset(hanging),
        aux_loaded=tuple(aux),
        env=dict(env),
        netdev_delay=_delay(udev, "netdev_delay_s", 0.5),
        rename=udev.get("rename", bool, True),
        rename_delay=_delay(udev, "rename_delay_s", 0.1),
        late_vfs={int(k): float(v) for k, v in late.items()},
        probe_parallel=udev.get("probe_parallel", int, 1, check=lambda v: 1 <= v <= 4096),
        blacklist_lag_s=float(udev.get("blacklist_lag_s", (int, float), 2.0,
                                       check=lambda v: v >= 0)),
        pfs=pfs,
        gpu=gpu,
        host=parse_host(f"{where}: [host]", data.get("host")),
        build=parse_build(f"{where}: [build]", data.get("build")),
        source=data,
    )


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read scenario: {e.strerror}") from None
    return parse_scenario(text, where=str(p))

