"""What `doctor` reads on the node (read-only): sysfs, /proc, the host's files, `mstconfig`.

Everything under the root prefix; `mstconfig` through the node's commands, with a timeout (a node
without the firmware tools gives no firmware finding, and says so in the log).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import Config
from ..host.commands import CommandTimeout
from ..host.files import InstanceLock
from ..host.headers_mount import headers_target, mount_points
from ..host.modules import loaded_srcversions, read_module_facts
from ..host.node import Tools
from ..lifecycle.decide import CORE
from ..lifecycle.journal import journal_dir
from ..lifecycle.preflight import Category, classify
from ..log import get_logger
from ..sriov.snapshot import load_snapshot
from .findings import NodeFacts, PfFirmware
from .rdma_config import Device, check

NVIDIA, MELLANOX = "0x10de", "0x15b3"
MSTCONFIG_TIMEOUT_S = 30.0
TRANSLATED_LINE = re.compile(r"Default domain type: \w+")


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace").strip()
    except OSError:
        return ""


def pci_functions(tools: Tools) -> list[tuple[str, Path]]:
    base = tools.paths.resolve("/sys/bus/pci/devices")
    return sorted((d.name, d) for d in base.iterdir()) if base.is_dir() else []


def connectx_devices(tools: Tools) -> tuple[list[Device], list[str], dict[str, Path]]:
    """(ConnectX functions, GPU PCI addresses, ConnectX PFs: pci -> sysfs dir)."""
    devices, gpus, pfs = [], [], {}
    for pci, d in pci_functions(tools):
        vendor = _read(d / "vendor")
        if vendor == NVIDIA and _read(d / "class").startswith("0x03"):
            gpus.append(pci)
        if vendor != MELLANOX:
            continue
        net = d / "net"
        netdevs = tuple(sorted(n.name for n in net.iterdir())) if net.is_dir() else ()
        link = "infiniband" if netdevs and _read(net / netdevs[0] / "type") == "32" else "ether"
        drv = d / "driver"
        devices.append(Device(pci, "15b3", _read(d / "device").removeprefix("0x"),
                              drv.readlink().name if drv.is_symlink() else None, netdevs, link,
                              pf=(d / "sriov_totalvfs").exists()))
        if (d / "sriov_totalvfs").exists():
            pfs[pci] = d
    return devices, gpus, pfs


def firmware(tools: Tools, pfs: dict[str, Path], wanted: dict[str, int]) -> list[PfFirmware]:
    log = get_logger("doctor")
    out: list[PfFirmware] = []
    for pci, d in pfs.items():
        argv = ["mstconfig", "-e", "-d", pci, "q", "NUM_OF_VFS", "SRIOV_EN"]
        try:
            res = tools.commands.run(argv, timeout_s=MSTCONFIG_TIMEOUT_S,
                                     what="read the PF's firmware configuration")
        except (OSError, CommandTimeout) as e:
            log.info("doctor.no_firmware_facts", pf=pci, error=str(e),
                     why="mstconfig (mstflint) is not there or did not answer: no firmware check")
            return out
        if not res.ok:
            continue
        cols: dict[str, tuple[str, str]] = {}
        for line in res.stdout.splitlines():
            words = line.replace("*", " ").split()
            if len(words) == 4 and words[0] in ("NUM_OF_VFS", "SRIOV_EN"):
                cols[words[0]] = (words[2], words[3])  # Current, Next Boot
        want = max(wanted.get(pci, 0), int(_read(d / "sriov_numvfs") or 0))

        def num(v: str) -> int:
            return int(re.sub(r"\D", "", v) or 0)

        out.append(PfFirmware(
            pci, (num(cols["NUM_OF_VFS"][0]), num(cols["NUM_OF_VFS"][1]))
            if "NUM_OF_VFS" in cols else None,
            (cols["SRIOV_EN"][0].startswith("True"), cols["SRIOV_EN"][1].startswith("True"))
            if "SRIOV_EN" in cols else None, want, " ".join(argv)))
    return out


def default_route_dev(tools: Tools) -> str | None:
    """The netdev of the default route: IPv4's (/proc/net/route), else IPv6's."""
    for line in _read(tools.paths.resolve("/proc/net/route")).splitlines()[1:]:
        f = line.split()
        if len(f) > 7 and f[1] == "00000000" and f[7] == "00000000":
            return f[0]
    for line in _read(tools.paths.resolve("/proc/net/ipv6_route")).splitlines():
        f = line.split()  # dst, dst len, src, src len, next hop, metric, refcnt, use, flags, dev
        if len(f) == 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo":
            return f[9]
    return None


def lowers(tools: Tools, dev: str) -> list[str]:
    """The netdevs under `dev` (a bond's slaves, a VLAN's parent), recursively."""
    d = tools.paths.resolve(f"/sys/class/net/{dev}")
    found = [p.name.removeprefix("lower_") for p in d.glob("lower_*")] if d.is_dir() else []
    return [x for n in found for x in (n, *lowers(tools, n))]


def vendor_was_ready(tools: Tools, config: Config) -> bool:
    """The lifecycle once brought this node to `serve` (its journal says so): the vendor driver
    belongs here. Before any run (a fresh node, a kernel upgrade) the inbox one is expected."""
    try:
        doc = json.loads((journal_dir(tools.paths, config) / "journal.json").read_text())
        return any(h.get("state") == "serve" for h in doc.get("history", []))
    except (OSError, ValueError, AttributeError):
        return False


def gather(tools: Tools, config: Config, rdma_config: Path | None = None, *,
           firmware_cache: dict[str, list[PfFirmware]] | None = None) -> NodeFacts:
    """`firmware_cache`: mstconfig's answers kept across calls (the daemon's: the firmware's
    configuration changes only by an administrator's mstconfig, and each call costs seconds on
    a real card)."""
    p = tools.paths
    f = NodeFacts()
    f.connectx, f.gpus, pfs = connectx_devices(tools)
    groups = p.resolve("/sys/kernel/iommu_groups")
    if groups.is_dir():
        f.iommu_types = [(str(p.node_path(t)), _read(t)) for t in sorted(groups.glob("*/type"))]
    f.cmdline = _read(p.resolve("/proc/cmdline"))
    for log in ("/var/log/dmesg", "/var/log/kern.log"):
        m = TRANSLATED_LINE.search(_read(p.resolve(log)))
        if m:
            f.boot_domain = (log, m.group(0))
            break
    snap, _damaged, _used = load_snapshot(journal_dir(p, config))
    wanted = {pf.pci: pf.numvfs for pf in snap.pfs} if snap else {}
    if f.connectx:
        key = ",".join(sorted(pfs))
        if firmware_cache is not None and key in firmware_cache:
            f.firmware = [PfFirmware(x.pci, x.num_vfs, x.sriov_en,
                                     max(x.wanted_vfs, wanted.get(x.pci, 0)), x.source)
                          for x in firmware_cache[key]]
        else:
            f.firmware = firmware(tools, pfs, wanted)
            if firmware_cache is not None:
                firmware_cache[key] = f.firmware
    if rdma_config is not None:
        f.rdma_file = str(rdma_config)
        f.rdma_problems = check(_read(rdma_config) if rdma_config.exists() else "", f.connectx)
    facts = read_module_facts(p)
    gates = {Category.STORAGE: ("storage", config.unload_storage_modules),
             Category.THIRD_PARTY: ("third-party", config.unload_third_party_rdma_modules)}
    for stack in ("ib_core", "mlx5_core", "mlx5_ib"):
        for h in facts[stack].holders if stack in facts else ():
            cat = classify(h, config)
            if cat in gates and not gates[cat][1]:
                f.refusals.append((gates[cat][0], f"{h} holds {stack}"))
    f.refusals = list(dict.fromkeys(f.refusals))
    if "nvidia_peermem" in facts:
        f.peermem_users = facts["nvidia_peermem"].refcnt
    blacklist = p.resolve(config.blacklist_file)
    f.blacklist = config.blacklist_file if blacklist.exists() else None
    f.daemon_running = bool(InstanceLock(p.resolve(config.lock_file_path)).held())
    target = headers_target(config.drivers_mount, config.shared_kernel_headers_dir)
    f.headers_mount = target if target in mount_points(p) else None
    try:
        named = json.loads(p.resolve(config.driver_ready_path).read_text())["srcversions"]
        f.marker = (config.driver_ready_path, {str(k): str(v) for k, v in named.items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        f.marker = None
    f.loaded = loaded_srcversions(p, [*CORE, *(f.marker[1] if f.marker else ())])
    core = p.resolve("/sys/module/mlx5_core")
    if core.is_dir() and not (core / "version").exists() and vendor_was_ready(tools, config):
        f.inbox_loaded = ("/sys/module/mlx5_core/version", "absent: the inbox build is loaded")
        try:
            res = tools.commands.run(["modinfo", "-F", "version", "mlx5_core"], timeout_s=30,
                                     what="the installed mlx5_core's version")
            f.installed_version = res.stdout.strip() or None if res.ok else None
        except (OSError, CommandTimeout):
            f.installed_version = None
    dev = default_route_dev(tools)
    if dev:
        for name in (dev, *lowers(tools, dev)):
            owner = next((d for d in f.connectx if name in d.netdevs and d.pci in pfs), None)
            if owner is not None:
                f.uplink = (dev, name, owner.pci)
                break
    return f
