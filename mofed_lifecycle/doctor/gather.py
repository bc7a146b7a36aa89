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
from ..host.files import InstanceLock, read_value
from ..host.headers_mount import headers_target, mount_points
from ..host.modules import loaded_srcversions, read_module_facts
from ..host.node import Tools
from ..lifecycle.decide import CORE
from ..lifecycle.journal import journal_dir
from ..lifecycle.preflight import Category, classify, plan
from ..log import get_logger
from ..sriov.snapshot import load_snapshot
from .findings import NodeFacts, PfFirmware
from .rdma_config import Device, check
from .uplink_path import uplink_path

NVIDIA, MELLANOX = "0x10de", "0x15b3"
MSTCONFIG_TIMEOUT_S = 30.0
TRANSLATED_LINE = re.compile(r"Default domain type: \w+")


def pci_functions(tools: Tools) -> list[tuple[str, Path]]:
    base = tools.paths.resolve("/sys/bus/pci/devices")
    return sorted((d.name, d) for d in base.iterdir()) if base.is_dir() else []


def connectx_devices(tools: Tools) -> tuple[list[Device], list[str], dict[str, Path]]:
    """(ConnectX functions, GPU PCI addresses, ConnectX PFs: pci -> sysfs dir)."""
    devices, gpus, pfs = [], [], {}
    for pci, d in pci_functions(tools):
        vendor = read_value(d / "vendor")
        if vendor == NVIDIA and read_value(d / "class").startswith("0x03"):
            gpus.append(pci)
        if vendor != MELLANOX:
            continue
        net = d / "net"
        netdevs = tuple(sorted(n.name for n in net.iterdir())) if net.is_dir() else ()
        ib = netdevs and read_value(net / netdevs[0] / "type") == "32"
        link = "infiniband" if ib else "ether"
        drv = d / "driver"
        devices.append(Device(pci, "15b3", read_value(d / "device").removeprefix("0x"),
                              drv.readlink().name if drv.is_symlink() else None, netdevs, link,
                              pf=not (d / "physfn").exists()))
        if not (d / "physfn").exists():  # a PF, SR-IOV on (sriov_totalvfs) or not
            pfs[pci] = d
    return devices, gpus, pfs


def _mst_int(value: str) -> int | None:
    """mstconfig's value: "16", "True(1)", "False(0)"; anything else is unknown (None), never 0."""
    m = re.fullmatch(r"(?:\w+\()?(\d+)\)?", value)
    return int(m.group(1)) if m else None


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
            words = line.replace("*", " ").split()  # name, [Default,] Current, Next Boot
            if len(words) >= 3 and words[0] in ("NUM_OF_VFS", "SRIOV_EN"):
                cols[words[0]] = (words[-2], words[-1])
        want = max(wanted.get(pci, 0), int(read_value(d / "sriov_numvfs") or 0))
        n = [_mst_int(v) for v in cols.get("NUM_OF_VFS", ())]
        en = [_mst_int(v) for v in cols.get("SRIOV_EN", ())]
        out.append(PfFirmware(
            pci, (n[0], n[1]) if len(n) == 2 and n[0] is not None and n[1] is not None else None,
            (bool(en[0]), bool(en[1])) if len(en) == 2 and None not in en else None,
            want, " ".join(argv)))
    return out


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
        f.iommu_types = [(str(p.node_path(t)), read_value(t))
                         for t in sorted(groups.glob("*/type"))]
    f.cmdline = read_value(p.resolve("/proc/cmdline"))
    for log in ("/var/log/dmesg", "/var/log/kern.log"):  # this boot's, then the journal's
        lines = TRANSLATED_LINE.findall(read_value(p.resolve(log)))
        if lines:  # the last: kern.log keeps earlier boots' lines too
            f.boot_domain = (log, lines[-1])
            break
    f.iommu_groups_readable = groups.is_dir()
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
        f.rdma_problems = check(read_value(rdma_config) if rdma_config.exists() else "", f.connectx)
    facts = read_module_facts(p)
    # what the daemon's own preflight would refuse a reload for (so an unknown holder, a
    # storage module with a mount on it, ... are named too), by the holder's category
    kinds = {Category.STORAGE: "storage", Category.THIRD_PARTY: "third-party",
             Category.UNKNOWN: "unknown"}
    for why in plan(facts, config).refusals:
        holder = why.split(" ", 1)[0]  # "<module> (<category>) holds ..."; others name none
        cat = classify(holder, config) if holder in facts else None
        if cat in kinds:
            f.refusals.append((kinds[cat], why))
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
    f.uplink = uplink_path(tools, f.connectx, pfs, config.node_ip)
    return f
