"""`doctor`'s checks: node facts in, findings out; pure (gather.py reads the node).

Each finding has the contract's stable id (`shared/scenario-format.md`, "doctor finding ids"), a
severity, its subject, the evidence it read (file and value) and the exact fix. A clean node gives
none.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .rdma_config import Device
from .uplink_path import UplinkPath

ERROR, WARNING = "error", "warning"
TRANSLATED_TYPES = ("DMA", "DMA-FQ")
PASSTHROUGH_ARG = re.compile(r"(^|\s)(iommu=pt|iommu\.passthrough=(1|y|on))(\s|$)")


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str
    subject: str
    evidence: list[dict[str, str]]
    fix: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        return f"{self.id}:{self.subject}"


@dataclass
class PfFirmware:
    pci: str
    num_vfs: tuple[int, int] | None  # (current, next boot)
    sriov_en: tuple[bool, bool] | None
    wanted_vfs: int  # what sriov_numvfs or the saved snapshot wants
    source: str  # the command that read it


@dataclass
class NodeFacts:
    gpus: list[str] = field(default_factory=list)  # PCI addresses, vendor 0x10de
    connectx: list[Device] = field(default_factory=list)
    iommu_types: list[tuple[str, str]] = field(default_factory=list)  # (file, type)
    iommu_groups_readable: bool = True  # /sys/kernel/iommu_groups is there
    cmdline: str = ""
    boot_domain: tuple[str, str] | None = None  # (file, "Default domain type: ..." line)
    firmware: list[PfFirmware] = field(default_factory=list)
    rdma_problems: list[Any] = field(default_factory=list)  # rdma_config.Problem
    rdma_file: str | None = None
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (kind, reason) of preflight
    peermem_users: int | None = None  # nvidia_peermem's refcnt, None when not loaded
    blacklist: str | None = None  # the OFED blacklist file on the host, when one is there
    daemon_running: bool = False  # the lock is held (a swap may be under way)
    headers_mount: str | None = None  # a mount at the headers target, when one is there
    marker: tuple[str, dict[str, str]] | None = None  # (file, its srcversions)
    loaded: dict[str, str | None] = field(default_factory=dict)
    inbox_loaded: tuple[str, str] | None = None  # (file, why) when mlx5_core is the inbox build
    installed_version: str | None = None
    uplink: UplinkPath | None = None  # the default route's path down to ConnectX PFs


def check_iommu(f: NodeFacts) -> list[Finding]:
    if not f.gpus or not f.connectx:
        return []
    evidence = [{"file": p, "value": t} for p, t in f.iommu_types if t in TRANSLATED_TYPES]
    # the boot log says what some boot chose; the live groups say what this one has: the log
    # alone decides only where the groups cannot be read
    if f.boot_domain and "Translated" in f.boot_domain[1] and (
            evidence or not f.iommu_groups_readable):
        evidence.append({"file": f.boot_domain[0], "value": f.boot_domain[1]})
    if not evidence or PASSTHROUGH_ARG.search(f.cmdline):
        return []
    evidence.append({"file": "/proc/cmdline", "value": f.cmdline.strip() or "(empty)"})
    return [Finding("iommu-translated", ERROR, "iommu", evidence[:4],
                    "GPUDirect RDMA needs the IOMMU in passthrough: add `iommu=pt` to the kernel "
                    "command line (grubby --update-kernel=ALL --args=iommu=pt, or "
                    "GRUB_CMDLINE_LINUX in /etc/default/grub and update-grub) and reboot; "
                    f"{len(f.gpus)} GPU(s) and ConnectX here")]


def check_firmware(f: NodeFacts) -> list[Finding]:
    out: list[Finding] = []
    for fw in f.firmware:
        # off in firmware is a finding where VFs are wanted (the snapshot, the policy, or the
        # firmware's own NUM_OF_VFS); a node that uses no SR-IOV may well have it off
        # (or about to be: on now, off at the next boot); turned on but pending a cold cycle
        asked = fw.wanted_vfs > 0 or (fw.num_vfs is not None and max(fw.num_vfs) > 0)
        if fw.sriov_en is not None and ((not fw.sriov_en[0] and (asked or fw.sriov_en[1]))
                                        or (not fw.sriov_en[1] and asked)):
            out.append(Finding("fw-sriov-disabled", ERROR, fw.pci, [
                {"file": fw.source, "value": f"SRIOV_EN current {fw.sriov_en[0]}, next boot "
                 f"{fw.sriov_en[1]}"}],
                f"mstconfig -y -d {fw.pci} set SRIOV_EN=1 NUM_OF_VFS={max(fw.wanted_vfs, 1)}, "
                "then a cold power cycle (ipmitool chassis power cycle): a warm reboot does not "
                "apply it"))
            continue
        if fw.num_vfs is None:
            continue
        current, next_boot = fw.num_vfs
        if current != next_boot or current < fw.wanted_vfs:
            why = (f"NUM_OF_VFS current {current}, next boot {next_boot}" if current != next_boot
                   else f"NUM_OF_VFS {current} < {fw.wanted_vfs} VFs wanted")
            out.append(Finding("fw-numvfs-pending", ERROR, fw.pci,
                               [{"file": fw.source, "value": why}],
                               "cold power cycle needed; a warm reboot does not apply it "
                               "(ipmitool chassis power cycle)" if current != next_boot else
                               f"mstconfig -y -d {fw.pci} set NUM_OF_VFS={fw.wanted_vfs}, then "
                               "a cold power cycle; a warm reboot does not apply it"))
    return out


def check_rdma(f: NodeFacts) -> list[Finding]:
    return [Finding(p.id, ERROR, p.subject, [{"file": f.rdma_file or "config.json",
                                              "value": p.value}], p.fix)
            for p in f.rdma_problems]


def check_holders(f: NodeFacts) -> list[Finding]:
    ids = {"storage": "storage-holder", "third-party": "thirdparty-holder",
           "unknown": "thirdparty-holder"}
    gated = ("a reload is refused while it is loaded: unload it (modprobe -r), or allow it with "
             "UNLOAD_STORAGE_MODULES=true / UNLOAD_THIRD_PARTY_RDMA_MODULES=true")
    return [Finding(ids[kind], WARNING, why.split(" ", 1)[0],
                    [{"file": "/proc/modules", "value": why}],
                    gated if "=true to let the reload" in why else why.split("; ", 1)[-1])
            for kind, why in f.refusals if kind in ids]


def check_peermem(f: NodeFacts) -> list[Finding]:
    if not f.peermem_users:
        return []
    return [Finding("peermem-in-use", WARNING, "nvidia_peermem", [
        {"file": "/sys/module/nvidia_peermem/refcnt", "value": str(f.peermem_users)}],
        "a driver reload is refused while GPU jobs use GPUDirect RDMA: drain the node's GPU "
        "workloads before a NIC driver upgrade")]


def check_leftovers(f: NodeFacts) -> list[Finding]:
    out: list[Finding] = []
    if f.blacklist and not f.daemon_running:
        out.append(Finding("blacklist-leftover", ERROR, f.blacklist,
                           [{"file": f.blacklist, "value": "present, no lifecycle running"}],
                           f"rm {f.blacklist} (the host's udev would not load mlx5_core on a new "
                           "device, nor after a reboot), or start the driver container: it "
                           "removes it"))
    if f.headers_mount and not f.daemon_running and f.marker is None:  # (a marker: still served)
        out.append(Finding("headers-mount-stale", WARNING, f.headers_mount,
                           [{"file": "/proc/self/mountinfo", "value": f.headers_mount}],
                           f"umount -l -R {f.headers_mount} (a killed container's: the GPU side "
                           "would build nvidia-peermem against stale headers)"))
    return out


def check_marker(f: NodeFacts) -> list[Finding]:
    if f.marker is None:
        return []
    path, named = f.marker
    wrong = {m: (v, f.loaded.get(m)) for m, v in named.items() if f.loaded.get(m) != v}
    if not wrong:
        return []
    return [Finding("marker-stale", ERROR, path, [
        {"file": path, "value": ", ".join(f"{m} marker {a} loaded {b}" for m, (a, b) in
                                          sorted(wrong.items()))}],
        f"the marker says a driver that is not loaded: rm {path} and restart the driver "
        "container (it sets the marker again once the installed driver is loaded)")]


def check_inbox(f: NodeFacts) -> list[Finding]:
    if f.inbox_loaded is None or not f.installed_version or f.daemon_running:
        return []
    return [Finding("inbox-driver-loaded", ERROR, "mlx5_core", [
        {"file": f.inbox_loaded[0], "value": f.inbox_loaded[1]},
        {"file": "modinfo -F version mlx5_core", "value": f.installed_version}],
        "the vendor driver is installed but the inbox one is loaded: start (or restart) the "
        "driver container, which reloads it")]


def check_uplink(f: NodeFacts) -> list[Finding]:
    up = f.uplink
    if up is None:
        return []
    pf, _pci = up.first
    over = "" if list(up.pfs) == [up.route_dev] else f" over {', '.join(up.pfs)}"
    pcis = ", ".join(sorted(set(up.pfs.values())))
    evidence = [{"file": up.source, "value": f"{up.carries} on {up.route_dev}{over} (PF "
                 f"{pcis})"}]
    fix = (f"a driver reload takes this PF down and the node's {up.carries} with it: keep "
           "UPLINK_POLICY=restore (addresses and routes re-applied as soon as the PF is back), "
           "or move the management network to a NIC the driver does not own")
    if up.dies_with_pf:
        evidence.append({"file": f"/sys/class/net/{up.dies_with_pf[0]}",
                         "value": f"{', '.join(up.dies_with_pf)} stacked on the PF: destroyed "
                                  "with it, not recreated"})
        fix = ("a driver reload destroys the VLAN/macvlan that carries the node's "
               f"{up.carries}, and UPLINK_POLICY=restore refuses that reload: move the management "
               "network to a NIC the driver does not own (or onto a bond, which survives), or "
               "set UPLINK_POLICY=ignore and recreate it yourself after a reload")
    return [Finding("uplink-on-reloaded-pf", WARNING, pf, evidence, fix)]


CHECKS = (check_iommu, check_firmware, check_rdma, check_holders, check_peermem, check_leftovers,
          check_marker, check_inbox, check_uplink)


def diagnose(f: NodeFacts) -> list[Finding]:
    return [finding for check in CHECKS for finding in check(f)]


def format_findings(findings: list[Finding]) -> str:
    if not findings:
        return "doctor: no finding: nothing on this node is known to break the NIC driver or RDMA"
    lines = [f"doctor: {len(findings)} finding(s)"]
    for x in findings:
        lines.append(f"{x.severity.upper():8}{x.id}  ({x.subject})")
        lines += [f"          read {e['file']}: {e['value']}" for e in x.evidence]
        lines.append(f"          fix: {x.fix}")
    return "\n".join(lines)
