"""udev events as the project reads them (host.udev.PyudevNetdevEvents, sriov.readiness) for a
real PCI netdev (QEMU's e1000e) through unbind/bind and renames, with Debian's systemd-udevd and
its naming and altname policy; and the representor two-phase rename (sriov.representors) on
netdevsim's switchdev representors under that policy."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mofed_lifecycle.host.netlink import PyrouteNetlink
from mofed_lifecycle.host.netlink_types import LinkChange, NetlinkError
from mofed_lifecycle.host.node import open_node
from mofed_lifecycle.host.paths import NodePaths
from mofed_lifecycle.host.udev import NetdevEvent, PyudevNetdevEvents
from mofed_lifecycle.log import get_logger
from mofed_lifecycle.sriov.model import PfSnapshot
from mofed_lifecycle.sriov.plan import rename_plan
from mofed_lifecycle.sriov.readiness import Readiness
from mofed_lifecycle.sriov.representors import rename_representor, temp_name
from mofed_lifecycle.sriov.snapshot import driver_of, netdev_of, representors

from .conftest import Nsim, settle, sh, wait_until
from .test_modules import e1000e_pci

PATHS = NodePaths.at("/")


def events_until(events: PyudevNetdevEvents, done, timeout: float = 30) -> list[NetdevEvent]:
    seen: list[NetdevEvent] = []
    deadline = time.monotonic() + timeout
    while not done(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"udev events seen so far: {seen}")
        ev = events.poll(min(left, 1.0))
        if ev is not None:
            seen.append(ev)
    return seen


@pytest.fixture
def e1000e():
    pci = e1000e_pci()
    settle()
    wait_until(lambda: netdev_of(PATHS, pci) is not None, "e1000e's netdev")
    yield pci
    if driver_of(PATHS, pci) is None:
        Path("/sys/bus/pci/drivers/e1000e/bind").write_text(pci)
    settle()


def test_rebind_gives_remove_then_add_with_the_final_name_and_readiness_sees_it(e1000e) -> None:
    pci, name = e1000e, netdev_of(PATHS, e1000e)
    events = PyudevNetdevEvents()  # opened before the action, as the daemon does
    try:
        ready = Readiness(events, lambda p: netdev_of(PATHS, p), lambda p: driver_of(PATHS, p))
        Path("/sys/bus/pci/drivers/e1000e/unbind").write_text(pci)
        ready.expect(pci, name, "e1000e", check_now=False)
        Path("/sys/bus/pci/drivers/e1000e/bind").write_text(pci)
        got = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = ready.poll(1.0)
        assert got, f"no ready event for {pci}; pending {ready.pending()}"
        assert got[0].netdev == name  # udev's final name, carried by the add event itself
        assert netdev_of(PATHS, pci) == name
    finally:
        events.close()


def test_a_rename_is_a_move_event_and_udev_keeps_its_name_as_an_altname(e1000e) -> None:
    pci, name = e1000e, netdev_of(PATHS, e1000e)
    nl = PyrouteNetlink()
    events = PyudevNetdevEvents()
    try:
        nl.set_link(name, LinkChange(name="mltlane0", up=False))
        seen = events_until(events, lambda s: any(e.action == "move" for e in s))
        move = next(e for e in seen if e.action == "move")
        assert (move.name, move.old_name, move.pci) == ("mltlane0", name, pci)
        settle()
        link = nl.link("mltlane0")
        assert link is not None
        assert name in link.altnames  # udev 252: the name it gave stays as an altname ...
        with pytest.raises(NetlinkError) as e:  # ... and the kernel refuses it as a name
            nl.set_link("mltlane0", LinkChange(name=name))
        assert e.value.errno == errno.EEXIST
        nl.del_altname("mltlane0", name)
        nl.set_link("mltlane0", LinkChange(name=name))
        assert netdev_of(PATHS, pci) == name
    finally:
        if nl.link("mltlane0") is not None:
            for alt in nl.link("mltlane0").altnames:
                nl.del_altname("mltlane0", alt)
            nl.set_link("mltlane0", LinkChange(name=name))
        events.close()
        nl.close()


# ---- switchdev representors -----------------------------------------------------------------

FAKE_PCI = "0000:00:1f.7"  # the netdevsim device, seen by the project as a PCI PF


@pytest.fixture
def switchdev(nsim: Nsim, tmp_path: Path):
    """netdevsim in switchdev mode with 3 VFs; a root whose sys/bus/pci/devices/FAKE_PCI is the
    netdevsim device, so the project's readers (representors(), phys_port_name) find it."""
    sh("devlink", "dev", "eswitch", "set", f"netdevsim/netdevsim{nsim.id}", "mode", "switchdev")
    nsim.numvfs(3)
    settle()
    root = tmp_path / "root"
    (root / "sys/bus/pci/devices").mkdir(parents=True)
    os.symlink(nsim.dir, root / "sys/bus/pci/devices" / FAKE_PCI)
    paths = NodePaths.at(root)
    wait_until(lambda: len(representors(paths, FAKE_PCI)) == 3, "3 representors")
    settle()
    yield paths
    nsim.numvfs(0)


def test_two_representors_swap_names_in_two_phases_despite_udevs_altnames(switchdev) -> None:
    """The bug the first real-kernel run found: udev keeps each name it gave as an altname once
    the netdev is renamed away, and the kernel refuses a rename to any altname (EEXIST): the
    third rename of a swap failed. rename_representor removes such an altname of our own."""
    paths = switchdev
    current = representors(paths, FAKE_PCI)
    wanted = {0: current[1], 1: current[0], 2: current[2]}  # VF 0 and 1 swap names
    pf = PfSnapshot(pci=FAKE_PCI, netdev=None, link_type=1, mtu=None, up=None, mac=None,
                    eswitch="switchdev", numvfs=3, autoprobe=True)
    node = open_node("/")
    restorer = SimpleNamespace(node=node, paths=paths, log=get_logger("lane"))
    try:
        for old, new in rename_plan(current, wanted, lambda i: temp_name(pf, i)):
            rename_representor(restorer, pf, old, new)
            settle()  # udev's move handling (and its altname) lands before the next rename
        assert representors(paths, FAKE_PCI) == wanted
    finally:
        node.close()


def test_the_same_swap_by_plain_renames_fails_on_udevs_altname(switchdev) -> None:
    """What the code before the fix did (rename, nothing else): the rename to a name that udev
    now keeps as an altname of the other representor is refused with EEXIST."""
    paths = switchdev
    current = representors(paths, FAKE_PCI)
    wanted = {0: current[1], 1: current[0]}
    pf = PfSnapshot(pci=FAKE_PCI, netdev=None, link_type=1, mtu=None, up=None, mac=None,
                    eswitch="switchdev", numvfs=3, autoprobe=True)
    nl = PyrouteNetlink()
    refused = None
    try:
        for old, new in rename_plan(current, wanted, lambda i: temp_name(pf, i)):
            try:
                nl.set_link(old, LinkChange(name=new, up=False))
            except NetlinkError as e:
                refused = (old, new, e.errno)
                break
            settle()
    finally:
        nl.close()
    assert refused is not None and refused[2] == errno.EEXIST, refused
    assert refused[1] in (current[0], current[1])
