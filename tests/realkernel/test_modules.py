"""Module facts and unloading on real kmod and a real kernel: srcversion, holders, refcnt,
/proc/modules, the unload order, `modprobe -r` / `rmmod` of what is not loaded, unversioned
(Debian's inbox) modules and the reload decision's explanation for them, and a blacklist that stops
an alias load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mofed_lifecycle.host.commands import Commands
from mofed_lifecycle.host.modules import (
    ModuleCommandError,
    installed_srcversions,
    loaded_srcversions,
    modprobe,
    modprobe_remove,
    read_module_facts,
)
from mofed_lifecycle.host.paths import NodePaths
from mofed_lifecycle.lifecycle.blacklist import remove_blacklist, write_blacklist
from mofed_lifecycle.lifecycle.decide import decide

from .conftest import settle, sh, wait_until

PATHS = NodePaths.at("/")
COMMANDS = Commands(os.environ)


def unload(*names: str) -> None:
    for n in names:
        if Path(f"/sys/module/{n}").exists():
            sh("modprobe", "-r", n, check=False)


@pytest.fixture
def netdevsim_loaded():
    unload("netdevsim")
    modprobe(["netdevsim"], COMMANDS, 30)
    yield
    unload("netdevsim", "psample")


def test_facts_of_a_loaded_module_match_proc_modules_sysfs_and_modinfo(netdevsim_loaded) -> None:
    facts = read_module_facts(PATHS)
    assert "netdevsim" in facts and "psample" in facts
    assert "netdevsim" in facts["psample"].holders  # netdevsim uses psample
    assert facts["psample"].refcnt >= 1
    loaded = loaded_srcversions(PATHS, ["netdevsim"])["netdevsim"]
    installed = installed_srcversions(["netdevsim"], COMMANDS, 30)["netdevsim"]
    assert loaded is not None and loaded == installed  # built with MODULE_SRCVERSION_ALL
    assert decide({"netdevsim": loaded}, {"netdevsim": installed}, ["netdevsim"],
                  present=facts).reload is False


def test_a_holder_first_unload_order_works_and_the_reverse_is_refused(netdevsim_loaded) -> None:
    with pytest.raises(ModuleCommandError) as e:
        modprobe_remove(["psample"], COMMANDS, 30)
    assert "in use" in str(e.value) or "in use" in e.value.stderr
    assert "psample" in read_module_facts(PATHS)
    modprobe_remove(["netdevsim", "psample"], COMMANDS, 30)
    facts = read_module_facts(PATHS)
    assert "netdevsim" not in facts and "psample" not in facts


def test_removing_a_module_that_is_not_loaded_is_fine_with_modprobe_and_with_rmmod() -> None:
    unload("netdevsim")
    r = COMMANDS.run(["modprobe", "-r", "netdevsim"], timeout_s=30)
    assert r.returncode == 0 and r.stderr == ""  # kmod: silent success
    r = COMMANDS.run(["rmmod", "netdevsim"], timeout_s=30)
    assert r.returncode == 1 and "is not currently loaded" in r.stderr
    modprobe_remove(["netdevsim", "nvidia_peermem"], COMMANDS, 30)  # the latter via rmmod


def test_an_unversioned_inbox_module_is_explained_as_such() -> None:
    """Debian's inbox mlx5_core/ib_core load without hardware and carry no srcversion: the
    decision must say "unversioned", not "not loaded" (the no-harm issue's fix)."""
    modprobe(["mlx5_ib"], COMMANDS, 60)  # and with it mlx5_core, ib_core, ib_uverbs
    try:
        facts = read_module_facts(PATHS)
        mods = ["mlx5_core", "mlx5_ib", "ib_core"]
        assert set(mods) <= set(facts)
        assert not any(Path(f"/sys/module/{m}/srcversion").exists() for m in mods)
        loaded = loaded_srcversions(PATHS, mods)
        installed = installed_srcversions(mods, COMMANDS, 30)
        assert set(loaded.values()) == {None} and set(installed.values()) == {None}
        d = decide(loaded, installed, mods, present=facts)
        assert d.reload
        assert "mlx5_core has no srcversion (an unversioned, inbox build)" in d.explain()
        assert "not loaded" not in d.explain()
        # what the code before the fix did: judge "loaded" by the srcversion alone, which calls
        # these loaded modules absent
        before_fix = decide(loaded, installed, mods).explain()
        assert "mlx5_core neither loaded nor installed" in before_fix
    finally:
        unload("mlx5_ib", "mlx5_core", "ib_uverbs", "ib_core")


def e1000e_pci() -> str:
    for d in sorted(Path("/sys/bus/pci/drivers/e1000e").glob("0000:*")):
        return d.name
    for d in sorted(Path("/sys/bus/pci/devices").iterdir()):
        if (d / "vendor").read_text().strip() == "0x8086" and (d / "class").read_text(
        ).startswith("0x0200"):
            return d.name
    raise AssertionError("the lane's guest has no e1000e (QEMU -device e1000e)")


def alias_load(pci: str) -> bool:
    """Ask udev for the device's driver by alias (its `add` event): True if e1000e got loaded."""
    unload("e1000e")
    sh("udevadm", "trigger", "--action=add", f"/sys/bus/pci/devices/{pci}")
    settle()
    return Path("/sys/module/e1000e").exists()


def test_our_blacklist_file_stops_an_alias_load_and_its_removal_lets_it_through(tmp_path) -> None:
    pci = e1000e_pci()
    conf = Path("/etc/modprobe.d/blacklist-ofed-modules.conf")
    try:
        assert alias_load(pci), "without a blacklist udev loads e1000e by alias"
        write_blacklist(conf, ("e1000e",), tmp_path)
        sh("udevadm", "control", "--reload")  # udev re-reads modprobe.d lazily (contract v2)
        assert not alias_load(pci), "blacklisted: the alias load must not load e1000e"
        # by name, a blacklist does not stop modprobe (what openibd relies on)
        modprobe(["e1000e"], COMMANDS, 60)
        assert Path("/sys/module/e1000e").exists()
        assert remove_blacklist(conf, tmp_path) == "removed"
        sh("udevadm", "control", "--reload")
        assert alias_load(pci)
    finally:
        conf.unlink(missing_ok=True)
        if not Path("/sys/module/e1000e").exists():
            sh("modprobe", "e1000e", check=False)
        wait_until(lambda: Path(f"/sys/bus/pci/devices/{pci}/driver").exists(), "e1000e bound")
