"""`sriov_numvfs` semantics through the project's sysfs writer (host.sysfs.KernelSysfs) on a real
PCI device with SR-IOV (QEMU's NVMe controller) and on netdevsim; the snapshot's readers of
virtfnN / physfn / driver on the real tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mofed_lifecycle.host.paths import NodePaths
from mofed_lifecycle.host.sysfs import KernelSysfs
from mofed_lifecycle.sriov.snapshot import driver_of, vf_pci

from .conftest import Nsim, settle, wait_until

PCI = Path("/sys/bus/pci/devices")
PATHS = NodePaths.at("/")


def nvme_pf() -> str:
    for d in sorted(PCI.iterdir()):
        if (d / "class").read_text().startswith("0x0108") and (d / "sriov_totalvfs").exists():
            return d.name
    raise AssertionError("the lane's guest has no NVMe controller with SR-IOV (QEMU -device nvme)")


def write_errno(path: Path, value: str) -> int | None:
    try:
        KernelSysfs().write(path, value)
    except OSError as e:
        return e.errno
    return None


@pytest.fixture
def nvme():
    pf = nvme_pf()
    yield pf
    KernelSysfs().write(PCI / pf / "sriov_numvfs", "0")


def test_a_pci_pf_creates_and_removes_vfs_with_virtfn_and_physfn_links(nvme: str) -> None:
    dev = PCI / nvme
    assert int((dev / "sriov_totalvfs").read_text()) == 2
    assert (dev / "sriov_drivers_autoprobe").read_text().strip() == "1"
    KernelSysfs().write(dev / "sriov_numvfs", "2")
    assert (dev / "sriov_numvfs").read_text().strip() == "2"
    vfs = [vf_pci(PATHS, nvme, i) for i in range(2)]
    assert all(vfs), vfs
    for vf in vfs:
        assert os.path.basename(os.readlink(PCI / vf / "physfn")) == nvme
    KernelSysfs().write(dev / "sriov_numvfs", "0")
    assert vf_pci(PATHS, nvme, 0) is None
    assert not any((PCI / v).exists() for v in vfs)


def test_changing_between_two_nonzero_counts_is_ebusy_and_above_total_erange(nvme: str) -> None:
    attr = PCI / nvme / "sriov_numvfs"
    KernelSysfs().write(attr, "1")
    assert write_errno(attr, "2") == errno.EBUSY
    assert attr.read_text().strip() == "1"
    KernelSysfs().write(attr, "0")
    assert write_errno(attr, "3") == errno.ERANGE
    assert write_errno(attr, "junk") == errno.EINVAL
    assert attr.read_text().strip() == "0"


def test_autoprobe_off_leaves_new_vfs_unbound_until_bound(nvme: str) -> None:
    dev = PCI / nvme
    KernelSysfs().write(dev / "sriov_drivers_autoprobe", "0")
    try:
        KernelSysfs().write(dev / "sriov_numvfs", "1")
        vf = vf_pci(PATHS, nvme, 0)
        assert vf is not None and driver_of(PATHS, vf) is None
        KernelSysfs().write(PCI / vf / "driver_override", "nvme")
        KernelSysfs().write(Path("/sys/bus/pci/drivers_probe"), vf)
        # the bind write returns when the probe has run (synchronous probe)
        assert driver_of(PATHS, vf) == "nvme"
        KernelSysfs().write(dev / "sriov_numvfs", "0")
    finally:
        KernelSysfs().write(dev / "sriov_drivers_autoprobe", "1")


def test_netdevsim_numvfs_semantics(nsim: Nsim) -> None:
    attr = nsim.dir / "sriov_numvfs"
    KernelSysfs().write(attr, "2")
    assert write_errno(attr, "3") == errno.EBUSY
    KernelSysfs().write(attr, "0")
    assert write_errno(attr, "junk") == errno.EINVAL
    assert write_errno(attr, "5") == errno.ENOMEM  # netdevsim takes up to 4
    KernelSysfs().write(attr, "4")
    settle()
    wait_until(lambda: attr.read_text().strip() == "4", "4 VFs")
