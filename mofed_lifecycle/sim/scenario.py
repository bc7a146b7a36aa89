"""Scenario files (TOML, `shared/scenario-format.md`): parsed, validated and made deterministic.

Everything random about a simulated node (netdev delays, default MACs and GUIDs, srcversions of
unlisted modules) is derived here from the seed, so the same scenario always gives the same node.
"""

from __future__ import annotations

import hashlib
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The classic stack `openibd` knows, and who uses whom ("a uses b": a is in b's holders/).
STACK_DEPS: dict[str, tuple[str, ...]] = {
    "mlx_compat": (),
    "ib_core": ("mlx_compat",),
    "ib_cm": ("ib_core", "mlx_compat"),
    "iw_cm": ("ib_core", "mlx_compat"),
    "rdma_cm": ("ib_core", "ib_cm", "iw_cm", "mlx_compat"),
    "ib_uverbs": ("ib_core", "mlx_compat"),
    "ib_umad": ("ib_core", "mlx_compat"),
    "rdma_ucm": ("ib_core", "rdma_cm", "ib_uverbs", "mlx_compat"),
    "ib_ipoib": ("ib_core", "ib_cm", "mlx_compat"),
    "mlxfw": ("mlx_compat",),
    "mlx5_core": ("mlxfw", "mlx_compat"),
    "mlx5_ib": ("mlx5_core", "ib_core", "ib_uverbs", "mlx_compat"),
}
# mlx5 auxiliary drivers: not known to openibd, so they make it fail "in use" while loaded.
AUX_DEPS: dict[str, tuple[str, ...]] = {
    "mlx5_vdpa": ("mlx5_core",),
    "mlx5_fwctl": ("mlx5_core",),
    "mlx5_dpll": ("mlx5_core",),
}
INBOX = "inbox"
PEER_SYMBOLS = ("ib_register_peer_memory_client", "ib_unregister_peer_memory_client")
MELLANOX_VENDOR = "0x15b3"
PCI_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
GUID_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
KERNEL_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LINK_STATES = ("auto", "enable", "disable")
VF_KEYS = {
    "mac", "vlan", "qos", "trust", "spoofchk", "link_state", "min_tx_rate", "max_tx_rate",
    "node_guid", "port_guid", "mtu", "up", "driver",
}


class ScenarioError(ValueError):
    """A scenario file that does not follow the contract; the message names the file and key."""


def peer_exporter(version: str) -> str | None:
    """Which module exports the peer-memory API for a driver version (None: the inbox stack)."""
    if version == INBOX:
        return None
    m = re.match(r"^(\d+)\.(\d+)", version)
    if not m:
        return "ib_core"
    return "ib_uverbs" if (int(m.group(1)), int(m.group(2))) >= (24, 7) else "ib_core"


def derived_srcversion(version: str, module: str) -> str:
    """A stable 23-hex-digit srcversion for a module of a driver version (what modinfo shows)."""
    return hashlib.sha256(f"{version}/{module}".encode()).hexdigest()[:23].upper()


def stack_modules(version: str) -> tuple[str, ...]:
    """The stack modules a driver version loads (the inbox stack has no mlx_compat)."""
    return tuple(m for m in STACK_DEPS if not (version == INBOX and m == "mlx_compat"))


def deps_for(version: str, module: str) -> tuple[str, ...]:
    deps = STACK_DEPS.get(module) or AUX_DEPS.get(module) or ()
    return tuple(d for d in deps if not (version == INBOX and d == "mlx_compat"))


def _derived_bytes(seed: int, *key: object, n: int) -> bytes:
    return hashlib.sha256("/".join(str(k) for k in (seed, *key)).encode()).digest()[:n]


def derived_mac(seed: int, pci: str, vf: int | str) -> str:
    """A locally administered unicast MAC, stable for (seed, pci, vf)."""
    b = bytearray(_derived_bytes(seed, "mac", pci, vf, n=6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def derived_guid(seed: int, pci: str, vf: int | str, kind: str) -> str:
    return ":".join(f"{x:02x}" for x in _derived_bytes(seed, kind, pci, vf, n=8))


def vf_pci(pf_pci: str, index: int, offset: int = 2, stride: int = 1) -> str:
    """A VF's PCI address: routing ID of the PF + offset + stride * index (ConnectX: 2, 1)."""
    dom, bus, devfn = pf_pci.split(":")
    dev, fn = devfn.split(".")
    rid = (int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn)) + offset + stride * index
    return f"{dom}:{(rid >> 8) & 0xFF:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"


@dataclass(frozen=True)
class Delay:
    """A delay spec: a fixed value, a [lo, hi] range, or one value per VF index."""

    lo: float = 0.0
    hi: float = 0.0
    per_index: tuple[float, ...] = ()

    def draw(self, seed: int, *key: object, index: int | None = None) -> float:
        if self.per_index and index is not None and index < len(self.per_index):
            return self.per_index[index]
        if self.hi <= self.lo:
            return self.lo
        rng = random.Random("/".join(str(k) for k in (seed, *key)))
        return self.lo + (self.hi - self.lo) * rng.random()

    @property
    def max(self) -> float:
        return max((self.hi, self.lo, *self.per_index))


@dataclass(frozen=True)
class VfSpec:
    index: int
    pci: str
    mac: str | None  # None for IB VFs
    vlan: int = 0
    qos: int = 0
    trust: bool = False
    spoofchk: bool = True
    link_state: str = "auto"
    min_tx_rate: int = 0
    max_tx_rate: int = 0
    node_guid: str | None = None
    port_guid: str | None = None
    mtu: int = 1500
    up: bool = True
    driver: str = "mlx5_core"


@dataclass(frozen=True)
class PfSpec:
    pci: str
    name: str
    link: str  # "eth" | "ib"
    mtu: int
    up: bool
    eswitch: str
    numvfs: int
    totalvfs: int
    vf_name: str
    mac: str
    vfs: tuple[VfSpec, ...]
    vf_offset: int = 2  # sriov_offset: first VF's routing ID - the PF's (stride is 1)
    rep_name: str = "{pf}_{vf}"  # udev's name for VF representors (switchdev)

    @property
    def link_type(self) -> int:
        return 32 if self.link == "ib" else 1

    def vf_final_name(self, index: int) -> str:
        return self.vf_name.format(vf=index, pf=self.name)

    def rep_final_name(self, index: int) -> str:
        return self.rep_name.format(vf=index, pf=self.name)


@dataclass(frozen=True)
class GpuSpec:
    peermem_start_s: float = 0.0
    peermem_ko: str = "matching"  # matching | stub | stale
    peermem_loaded: bool = False
    peermem_users: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    kernel: str
    time_scale: float
    seed: int
    loaded_version: str
    installed_version: str
    loaded: dict[str, str]  # module -> srcversion of the modules loaded at start
    installed: dict[str, str]  # module -> srcversion of what modinfo reports
    openibd_restart_s: float
    openibd_failures: int
    extra_modules: tuple[tuple[str, tuple[str, ...]], ...]
    aux_loaded: tuple[str, ...]
    env: dict[str, str]
    netdev_delay: Delay
    rename: bool
    rename_delay: Delay
    late_vfs: dict[int, float]
    pfs: tuple[PfSpec, ...]
    gpu: GpuSpec | None
    source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def scaled(self, seconds: float) -> float:
        return seconds * self.time_scale

    def netdev_delay_s(self, pci: str, index: int | None) -> float:
        """Unscaled delay from a function's bind to its netdev (late_vfs overrides, per VF)."""
        if index is not None and index in self.late_vfs:
            return self.late_vfs[index]
        return self.netdev_delay.draw(self.seed, "netdev", pci, index, index=index)

    def rename_delay_s(self, pci: str, index: int | None) -> float:
        if not self.rename:
            return 0.0
        return self.rename_delay.draw(self.seed, "rename", pci, index, index=index)

    def vf_ready_delay_s(self, pf: PfSpec, index: int) -> float:
        """Scaled time from a VF's bind until udev has finished naming its netdev."""
        pci = vf_pci(pf.pci, index, pf.vf_offset)
        return self.scaled(self.netdev_delay_s(pci, index) + self.rename_delay_s(pci, index))

    def restore_limit_s(self) -> float:
        """The floor of any restore: every VF bound once, the slowest netdev ready (scaled).

        Only VFs that have a netdev count: one bound to vfio-pci (or left unbound) has none to wait
        for.
        """
        return max(
            (self.vf_ready_delay_s(pf, v.index) for pf in self.pfs for v in pf.vfs
             if v.driver == "mlx5_core"),
            default=0.0,
        )

    def host_srcversion(self, module: str) -> str:
        return self.loaded.get(module) or derived_srcversion(self.loaded_version, module)

    def installed_srcversion(self, module: str) -> str:
        return self.installed.get(module) or derived_srcversion(self.installed_version, module)


# ---- parsing ------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one TOML table with errors that name the file and key."""

    def __init__(self, where: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ScenarioError(f"{where}: expected a table, got {type(table).__name__}")
        self.where, self.table = where, table

    def fail(self, key: str, msg: str) -> ScenarioError:
        return ScenarioError(f"{self.where}.{key}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., check=None) -> Any:
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
        raise ScenarioError(f"{where}: not valid TOML: {e}") from None
    top = _Reader(where, data)
    node = _Reader(f"{where}: [node]", top.get("node", dict, {}))
    drv = _Reader(f"{where}: [driver]", top.get("driver", dict))
    udev = _Reader(f"{where}: [udev]", top.get("udev", dict, {}))
    seed = node.get("seed", int, 0)
    extra = []
    for i, em in enumerate(drv.get("extra_modules", list, [])):
        er = _Reader(f"{where}: [driver].extra_modules[{i}]", em)
        holds = er.get("holds", list, [])
        names = [er.get("name", str, check=lambda v: MODULE_RE.match(v)), *holds]
        if not all(isinstance(h, str) and MODULE_RE.match(h) for h in names):
            raise er.fail("holds", f"module names only, got {holds!r}")
        extra.append((names[0].replace("-", "_"), tuple(h.replace("-", "_") for h in holds)))
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
        aux_loaded=tuple(aux),
        env=dict(env),
        netdev_delay=_delay(udev, "netdev_delay_s", 0.5),
        rename=udev.get("rename", bool, True),
        rename_delay=_delay(udev, "rename_delay_s", 0.1),
        late_vfs={int(k): float(v) for k, v in late.items()},
        pfs=pfs,
        gpu=gpu,
        source=data,
    )


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read scenario: {e.strerror}") from None
    return parse_scenario(text, where=str(p))


__all__ = ["Scenario", "ScenarioError", "load_scenario", "parse_scenario"]
