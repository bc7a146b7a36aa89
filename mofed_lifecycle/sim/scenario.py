"""Scenarios (`shared/scenario-format.md`): the node they describe, made deterministic.

Everything random about a simulated node (netdev delays, default MACs and GUIDs, srcversions of
unlisted modules) is derived here from the seed, so the same scenario always gives the same node.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from .floor import probe_floor

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
NAME_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.-]{1,15}$")  # the kernel refuses "." and ".."
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
class HostSpec:
    iommu: str = "passthrough"
    gpus: int = 0
    default_route: str | None = None  # the netdev carrying the default route, if any
    uplink_addresses: tuple[str, ...] = ()  # addresses on it (CIDR)


@dataclass(frozen=True)
class FwSpec:
    num_of_vfs: int
    next_boot_num_of_vfs: int
    sriov_en: bool = True


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
    fw: FwSpec | None = None  # the firmware's VF configuration (None: allows totalvfs)

    @property
    def link_type(self) -> int:
        return 32 if self.link == "ib" else 1

    def vf_final_name(self, index: int) -> str:
        return self.vf_name.format(vf=index, pf=self.name)

    def rep_final_name(self, index: int) -> str:
        return self.rep_name.format(vf=index, pf=self.name)


@dataclass(frozen=True)
class BuildSpec:
    """[build] (contract version 2): how the driver gets onto the node."""

    mode: str = "precompiled"  # "precompiled" | "sources" | "dtk"
    build_s: float = 300.0  # one build's duration (unscaled)
    build_failures: int = 0  # the first N builds fail
    cache: str = "cold"  # "cold" | "warm": a matching build is in the inventory already
    dtk_sidecar_start_s: float = 5.0  # when the DTK sidecar starts watching (unscaled)

    @property
    def builds(self) -> bool:
        return self.mode != "precompiled"


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
    # [udev] probe_parallel: driver probes the kernel and firmware run at once (version 2)
    probe_parallel: int = 1
    # [udev] blacklist_lag_s: a blacklist younger than this (scaled) is not yet seen by udev
    blacklist_lag_s: float = 2.0
    host: HostSpec = field(default_factory=HostSpec)
    build: BuildSpec = field(default_factory=BuildSpec)
    hanging_loads: frozenset[str] = frozenset()  # extra modules whose `modprobe` never returns
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

    def vf_probes(self) -> dict[str, list[tuple[float, float]]]:
        """PF PCI -> (probe, rename) of each of its VFs that gets a netdev, scaled: what the
        floor is scheduled from (sim/floor.py). A VF bound to vfio-pci (or left unbound) has no
        netdev to wait for."""
        out: dict[str, list[tuple[float, float]]] = {}
        for pf in self.pfs:
            for v in pf.vfs:
                if v.driver == "mlx5_core":
                    pci = vf_pci(pf.pci, v.index, pf.vf_offset)
                    out.setdefault(pf.pci, []).append(
                        (self.scaled(self.netdev_delay_s(pci, v.index)),
                         self.scaled(self.rename_delay_s(pci, v.index))))
        return out

    def restore_limit_s(self) -> float:
        """The floor of any restore with every PF back at once: the best schedule of the VFs'
        probes on the probe lanes (sim/floor.py), the last rename included (scaled)."""
        jobs = self.vf_probes()
        return probe_floor(jobs, dict.fromkeys(jobs, 0.0), self.probe_parallel) or 0.0

    def host_srcversion(self, module: str) -> str:
        """A pinned one, else derived; "" for the inbox stack's others: built without
        MODULE_VERSION, they have no srcversion (contract version 2)."""
        if module in self.loaded or self.loaded_version != INBOX:
            return self.loaded.get(module) or derived_srcversion(self.loaded_version, module)
        return ""

    def installed_srcversion(self, module: str) -> str:
        if module in self.installed or self.installed_version != INBOX:
            return self.installed.get(module) or derived_srcversion(self.installed_version,
                                                                    module)
        return ""

