"""The simulator's version-2 kernel rules (shared/scenario-format.md, "Rules added in version 2"):
synchronous probes on `probe_parallel` lanes, and unversioned inbox modules. The real-kernel lane
shows the same on Linux: tests/realkernel/test_sriov_sysfs.py (a bind write returns with the driver
bound) and tests/realkernel/test_modules.py (an inbox module has no srcversion)."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from mofed_lifecycle.sim.client import KernelClient
from mofed_lifecycle.sim.scenario import vf_pci
from mofed_lifecycle.sim.scenario_parse import load_scenario

from .conftest import SCENARIOS

PF = "0000:08:00.0"
NUMVFS = f"sys/bus/pci/devices/{PF}/sriov_numvfs"
AUTOPROBE = f"sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe"
BIND = "sys/bus/pci/drivers/mlx5_core/bind"


def tiny(lanes: int = 1) -> str:
    text = (SCENARIOS / "tiny-eth.toml").read_text().replace(
        "late_vfs = { 3 = 6.0 }", f"probe_parallel = {lanes}")
    return text.replace("netdev_delay_s = [0.5, 2.0]", "netdev_delay_s = [5.0, 20.0]")


def probes(root: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (root / ".sim/timeline.jsonl").read_text().splitlines()]
    return {r["pci"]: r for r in rows if r["event"] == "pci.probe"}


def unbound_vfs(k: KernelClient) -> None:
    k.call("sysfs_write", path=NUMVFS, value="0")
    k.call("sysfs_write", path=AUTOPROBE, value="0")
    k.call("sysfs_write", path=NUMVFS, value="4")


def test_a_bind_write_returns_once_the_probe_has_run_with_the_netdev_there(make_node):
    root, k = make_node(tiny(), "bind")
    sc = load_scenario(root / ".sim/scenario.toml")
    unbound_vfs(k)
    vf = vf_pci(PF, 1, 2)
    k.call("sysfs_write", path=BIND, value=vf)
    st = k.call("state")["pfs"][PF]["vfs"]["1"]
    assert st["driver"] == "mlx5_core" and st["netdev"] is not None  # there when the write returns
    p = probes(root)[vf]
    assert p["end"] - p["start"] == pytest.approx(sc.scaled(sc.netdev_delay_s(vf, 1)), abs=1e-5)


def test_an_autoprobing_numvfs_write_probes_the_new_vfs_one_after_another(make_node):
    root, k = make_node(tiny(lanes=4), "autoprobe")
    k.call("sysfs_write", path=NUMVFS, value="0")
    k.call("sysfs_write", path=NUMVFS, value="4")
    vfs = k.call("state")["pfs"][PF]["vfs"]
    assert all(v["netdev"] is not None for v in vfs.values())  # every probe ended in the write
    p = probes(root)
    chain = [p[vf_pci(PF, i, 2)] for i in range(4)]
    for before, after in zip(chain, chain[1:], strict=False):
        assert after["start"] == pytest.approx(before["end"], abs=1e-5)  # lanes notwithstanding


@pytest.mark.parametrize("lanes", [1, 2])
def test_concurrent_binds_beyond_probe_parallel_wait_their_turn_inside_the_write(make_node, lanes):
    root, k = make_node(tiny(lanes), f"lanes{lanes}")
    unbound_vfs(k)
    errors: list[BaseException] = []

    def bind(i: int) -> None:
        try:
            with KernelClient(root) as c:
                c.call("sysfs_write", path=BIND, value=vf_pci(PF, i, 2))
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=bind, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    spans = sorted((r["start"], r["end"]) for r in probes(root).values())
    assert len(spans) == 4
    for t, _ in spans:  # at any probe's start, at most `lanes` probes are running
        assert sum(1 for s, e in spans if s <= t + 1e-9 < e) <= lanes
    if lanes == 1:  # one after another, back to back: the sum of the probes
        assert spans[-1][1] - spans[0][0] == pytest.approx(
            sum(e - s for s, e in spans), abs=1e-5)
    else:
        assert spans[1][0] == pytest.approx(spans[0][0], abs=0.5)  # two at once from the start


def test_the_inbox_stack_is_unversioned(make_node):
    text = (SCENARIOS / "tiny-eth.toml").read_text().replace(
        'loaded_version = "24.04-0.6.6"', 'loaded_version = "inbox"')
    root, k = make_node(text, "inbox")
    mods = k.call("state")["modules"]
    assert mods["mlx5_core"]["srcversion"] is None
    assert not (root / "sys/module/mlx5_core/srcversion").exists()
    assert (root / "sys/module/mlx5_core").is_dir()  # loaded all the same
    # an inbox build installed (the host's, -d /host... or an inbox-only image): modinfo prints
    # nothing for its srcversion, and exits 0
    text = text.replace('installed_version = "25.07-0.9.7"', 'installed_version = "inbox"')
    root2, _k2 = make_node(text, "inbox-installed")
    r = subprocess.run([str(root2 / ".sim/bin/modinfo"), "-F", "srcversion", "mlx5_core"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == ""


# ---- blacklist lag: udev re-reads modprobe.d lazily --------------------------------------------

def kernel_events(root: Path) -> list[str]:
    return [json.loads(x)["event"] for x in (root / ".sim/timeline.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("settle", "alias_loads"), [("0", 1), ("0.6", 0)])
def test_a_blacklist_younger_than_udevs_lag_does_not_stop_the_hosts_alias_load(make_node, settle,
                                                                               alias_loads):
    """udev sees a new blacklist only after [udev] blacklist_lag_s (here 0.4 s scaled): a reload
    that unloads at once lets the host's udev load its own mlx5_core mid-swap (openibd then fails
    and is retried); one that waits BLACKLIST_SETTLE_SEC past the lag sees none."""
    from .test_lifecycle import lifecycle

    text = (SCENARIOS / "tiny-eth.toml").read_text().replace(
        "[udev]\n", "[udev]\nblacklist_lag_s = 40.0\n")
    root, k = make_node(text, f"lag{settle}")
    r = lifecycle(root, "--once", env={"BLACKLIST_SETTLE_SEC": settle})
    assert r.returncode == 0, r.stderr[-2000:]
    events = kernel_events(root)
    assert events.count("udev.alias_autoload") == alias_loads
    unloads = events.count("openibd.unloaded")
    assert unloads == 1 + alias_loads  # the alias load costs an openibd retry
    mods = k.call("state")["modules"]
    sc = load_scenario(root / ".sim/scenario.toml")
    assert mods["mlx5_core"]["srcversion"] == sc.installed_srcversion("mlx5_core")
    if not alias_loads:
        assert "udev.alias_blacklisted" in events
