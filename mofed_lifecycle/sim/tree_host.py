"""The files of a simulated node's `[host]` table: what `doctor` and an operator read by the NIC.

- IOMMU: `/sys/kernel/iommu_groups/<n>/type` ("identity" in passthrough, "DMA-FQ" translated; no
  groups when off), `/proc/cmdline` (`iommu=pt` in passthrough) and the kernel log line
  `iommu: Default domain type: ...` in `/var/log/dmesg`, as a real node shows them.
- GPUs: one PCI function per GPU (vendor 0x10de, class 0x030200) on buses the PFs do not use.
"""

from __future__ import annotations

import os
from pathlib import Path

from .scenario import Scenario

IOMMU_GROUP_TYPE = {"passthrough": "identity", "translated": "DMA-FQ"}
DMESG_DOMAIN = {"passthrough": "Passthrough", "translated": "Translated"}
NVIDIA_VENDOR, GPU_CLASS, GPU_DEVICE = "0x10de", "0x030200", "0x2330"  # H100 SXM


def gpu_pcis(sc: Scenario) -> list[str]:
    """PCI addresses of the scenario's GPUs: 0000:<bus>:00.0 from bus 0xc0 up, not on PF buses."""
    used = {p.pci.split(":")[1] for p in sc.pfs}
    buses = [f"{b:02x}" for b in range(0xc0, 0x100) if f"{b:02x}" not in used]
    return [f"0000:{bus}:00.0" for bus in buses[:sc.host.gpus]]


def render_host(root: Path, sc: Scenario, pci_parent: str) -> None:
    mode = sc.host.iommu
    cmdline = f"BOOT_IMAGE=/boot/vmlinuz-{sc.kernel} root=/dev/sda1 ro quiet"
    if mode == "passthrough":
        cmdline += " iommu=pt"
    elif mode == "off":
        cmdline += " iommu=off"
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/cmdline").write_text(cmdline + "\n")
    log = root / "var/log/dmesg"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("[    0.000000] Linux version (simulated)\n" + (
        f"[    0.412345] iommu: Default domain type: {DMESG_DOMAIN[mode]}\n"
        if mode in DMESG_DOMAIN else ""))
    if mode in IOMMU_GROUP_TYPE:
        group = root / "sys/kernel/iommu_groups/0"
        group.mkdir(parents=True, exist_ok=True)
        (group / "type").write_text(IOMMU_GROUP_TYPE[mode] + "\n")
    for pci in gpu_pcis(sc):
        d = root / "sys" / pci_parent / pci
        d.mkdir(parents=True, exist_ok=True)
        for name, value in (("vendor", NVIDIA_VENDOR), ("device", GPU_DEVICE),
                            ("class", GPU_CLASS)):
            (d / name).write_text(value + "\n")
        link = root / "sys/bus/pci/devices" / pci
        if not link.is_symlink():
            os.symlink(f"../../../{pci_parent}/{pci}", link)
