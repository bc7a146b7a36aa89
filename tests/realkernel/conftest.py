"""The real-kernel lane's tests (`pytest -m realkernel`): they run inside the lane's QEMU guest
(scripts/realkernel-lane), as root, with Debian's kernel, systemd-udevd, kmod and rtnetlink; on any
other machine they are skipped with the reason. The main suite deselects them (pyproject addopts).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..test_lifecycle import wait_for as wait_until  # polls sysfs: no event for these attributes

IN_GUEST = os.environ.get("MOFED_REALKERNEL_GUEST") == "1"
CACHE = Path(os.environ.get("MOFED_LANE_CACHE", "/nonexistent"))
NSIM_BUS = Path("/sys/bus/netdevsim")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.realkernel)
            if not IN_GUEST:
                item.add_marker(pytest.mark.skip(
                    reason="needs the real-kernel lane's guest (scripts/realkernel-lane)"))


def sh(*argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=check)


def settle() -> None:
    sh("udevadm", "settle", "--timeout=30")


class Nsim:
    """One netdevsim device: its id, sysfs dir and PF netdev name (after udev's rename)."""

    def __init__(self, dev_id: int, ports: int = 1) -> None:
        self.id = dev_id
        (NSIM_BUS / "new_device").write_text(f"{dev_id} {ports}")
        self.dir = NSIM_BUS / "devices" / f"netdevsim{dev_id}"
        wait_until(lambda: any((self.dir / "net").glob("*")) if (self.dir / "net").is_dir()
                   else False, f"netdevsim{dev_id}'s netdev")
        settle()
        self.pf = sorted(p.name for p in (self.dir / "net").iterdir())[0]

    def numvfs(self, n: int) -> None:
        (self.dir / "sriov_numvfs").write_text(str(n))

    def delete(self) -> None:
        (NSIM_BUS / "del_device").write_text(str(self.id))
        settle()


def load_netdevsim(path: Path | None = None) -> None:
    """The lane's netdevsim (modprobe: extra/), or the module file at `path` (the GUID variant)."""
    if Path("/sys/module/netdevsim").exists():
        sh("modprobe", "-r", "netdevsim")
    if path is None:
        sh("modprobe", "netdevsim")
    else:
        sh("modprobe", "psample")
        sh("insmod", str(path))


@pytest.fixture
def nsim() -> Iterator[Nsim]:
    load_netdevsim()
    dev = Nsim(1)
    try:
        yield dev
    finally:
        dev.delete()


@pytest.fixture
def nsim_ib() -> Iterator[Nsim]:
    """A netdevsim PF of type InfiniBand with VF GUID operations (the lane's test variant)."""
    load_netdevsim(CACHE / "netdevsim-guid" / "netdevsim.ko")
    dev = Nsim(2)
    try:
        yield dev
    finally:
        dev.delete()
        sh("modprobe", "-r", "netdevsim", check=False)
