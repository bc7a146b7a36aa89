"""VF restore on simulated nodes, through the real `run`: every VF back as it was, bound once.

The comparison is the node's ground truth before the reload and after the run: admin settings on
the PF and what each VF's own netdev really has (netdev_mac, GUIDs, MTU, up, driver).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from .test_lifecycle import journal_states, jsonl, lifecycle, wait_for

IB = """
[node]
name = "ib-guids"
time_scale = 0.01
seed = 12
[driver]
loaded_version = "24.07-0.6.1"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
[udev]
netdev_delay_s = [0.3, 2.0]
rename_delay_s = [0.05, 0.3]
[[pf]]
pci = "0000:18:00.0"
name = "ibp24s0"
link = "ib"
mtu = 4092
numvfs = 3
vf_name = "ibp24s0v{vf}"
vf.all = { mtu = 4000 }
vf.0 = { node_guid = "00:11:22:33:44:55:18:00", port_guid = "00:11:22:33:44:55:18:01" }
vf.1 = { node_guid = "00:00:00:00:00:00:00:00", port_guid = "00:00:00:00:00:00:00:00" }
[[pf]]
pci = "0000:40:00.0"
name = "ibp64s0"
link = "ib"
numvfs = 2
vf_name = "ibp64s0v{vf}"
"""

SLOW = """
[node]
name = "slow-vf"
time_scale = 0.01
seed = 13
[driver]
loaded_version = "24.10-1.1.4"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
[udev]
netdev_delay_s = [5.0, 30.0]
rename_delay_s = [0.5, 5.0]
late_vfs = { 1 = 250.0 }
probe_parallel = 16  # parallel probes: the late VF holds its own lane, not the others'
[[pf]]
pci = "0000:3b:00.0"
name = "enp59s0f0np0"
mtu = 9000
numvfs = 8
vf_name = "enp59s0f0v{vf}"
vf.all = { trust = true, spoofchk = false, mtu = 9000 }
vf.1 = { mac = "02:00:00:00:3b:01", vlan = 7, qos = 2, link_state = "disable", max_tx_rate = 500 }
vf.5 = { driver = "vfio-pci" }
vf.6 = { up = false, mtu = 1500 }
"""


def vf_view(state: dict) -> dict:
    """PFs and VFs of a ground truth, as they must be after a restore (markers aside)."""
    return {pci: pf for pci, pf in state["pfs"].items()}


def assert_restored(before: dict, after: dict) -> None:
    for pci, pf in vf_view(before).items():
        now = after["pfs"][pci]
        assert {k: v for k, v in now.items() if k != "vfs"} == {
            k: v for k, v in pf.items() if k != "vfs"}, pci
        for index, vf in pf["vfs"].items():
            assert now["vfs"].get(index) == vf, f"VF {index} of {pci}"


def binds_since_reload(root: Path) -> dict[str, int]:
    """PCI -> how many times the kernel bound it after the last reload (its uevents)."""
    rows = [json.loads(x) for x in (root / ".sim/uevents.jsonl").read_text().splitlines()]
    last_unload = max(i for i, r in enumerate(rows)
                      if r["ACTION"] == "remove" and r["SUBSYSTEM"] == "pci")
    out: dict[str, int] = {}
    for r in rows[last_unload:]:
        if r["ACTION"] == "bind":
            pci = r["DEVPATH"].rsplit("/", 1)[-1]
            out[pci] = out.get(pci, 0) + 1
    return out


def test_every_vf_is_restored_and_bound_exactly_once(tiny):
    root, k = tiny
    before = k.call("state")
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    after = k.call("state")
    assert_restored(before, after)
    assert after["pfs"]["0000:08:00.0"]["vfs"]["2"]["driver"] == "vfio-pci"
    assert after["pfs"]["0000:08:00.0"]["autoprobe"] is True  # put back after the restore
    binds = binds_since_reload(root)
    assert {pci: n for pci, n in binds.items() if pci != "0000:08:00.0"} == {
        f"0000:08:00.{2 + i}": 1 for i in range(4)}


def test_ib_guids_come_back_and_all_zero_guids_are_left_alone(make_node):
    root, k = make_node(IB, "ib")
    before = k.call("state")
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    after = k.call("state")
    assert_restored(before, after)
    vf0 = after["pfs"]["0000:18:00.0"]["vfs"]["0"]
    assert vf0["node_guid"] == vf0["netdev_node_guid"] == "00:11:22:33:44:55:18:00"
    assert after["pfs"]["0000:18:00.0"]["vfs"]["1"]["port_guid"] == "00:00:00:00:00:00:00:00"


def test_a_restart_without_reload_touches_no_vf(tiny):
    root, k = tiny
    assert lifecycle(root, "--once").returncode == 0
    k.call("wait_settled", timeout=30)
    settled = k.call("state")
    binds = binds_since_reload(root)
    r = lifecycle(root, "--once")
    assert r.returncode == 0
    assert k.call("state")["pfs"] == settled["pfs"] and binds_since_reload(root) == binds
    assert '"restore.skipped"' in r.stderr


def test_a_vf_that_never_appears_is_reported_and_a_later_start_restores_it(make_node):
    root, k = make_node(SLOW, "slow")
    before = k.call("state")
    proc = lifecycle(root, env={"VF_RESTORE_TIMEOUT_SEC": "1"}, wait=False)
    try:
        wait_for(lambda: (root / "run/mellanox/drivers/.driver-ready").exists(), "ready", 60)
        assert proc.poll() is None  # alive
        status = json.loads((root / "run/mellanox/drivers/mofed-lifecycle/status.json").read_text())
        assert "0000:3b:00.3" in status["last_error"]  # VF 1, by PCI address
        after = k.call("state")
        for index, vf in before["pfs"]["0000:3b:00.0"]["vfs"].items():
            if index != "1":
                assert after["pfs"]["0000:3b:00.0"]["vfs"][index] == vf, index
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert any('"restore.vf_not_restored"' in line and "0000:3b:00.3" in line
               for line in err.splitlines())
    k.call("wait_settled", timeout=30)  # VF 1's netdev shows up, late, with default settings
    r = lifecycle(root, "--once")  # no reload needed: the pending restore resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reload" not in journal_states(root)[-8:]
    assert_restored(before, k.call("state"))


KILL_POINTS = {
    "numvfs-written": lambda ev, ue: any(e.get("event") == "sriov.numvfs" and e.get("numvfs")
                                         for e in ev),
    "some-bound": lambda ev, ue: sum(u["ACTION"] == "bind" for u in ue) >= 3,
    "first-netdev-named": lambda ev, ue: any(e.get("event") == "netdev.named"
                                             and e.get("pci") != "0000:3b:00.0" for e in ev),
    "half-named": lambda ev, ue: sum(e.get("event") == "netdev.named" for e in ev) >= 5,
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_killed_during_the_restore_no_vf_setting_is_lost(make_node, point):
    root, k = make_node(SLOW.replace("late_vfs = { 1 = 250.0 }", ""), "kill")
    before = k.call("state")

    def reached() -> bool:
        ev = jsonl(root / ".sim/timeline.jsonl")
        ue = jsonl(root / ".sim/uevents.jsonl")
        start = next((i for i, e in enumerate(ev) if e["event"] == "openibd.loaded"), None)
        if start is None:
            return False
        first_bind = next((i for i, u in enumerate(ue) if u["ACTION"] == "remove"), 0)
        return KILL_POINTS[point](ev[start:], ue[first_bind:])

    proc = lifecycle(root, wait=False)
    try:
        wait_for(reached, f"the restore to reach {point}", 60)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert journal_states(root)[-1] == "restore"
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    k.call("wait_settled", timeout=30)
    assert_restored(before, k.call("state"))


SWITCHDEV = Path(__file__).resolve().parent.parent / "mofed_lifecycle/sim/examples/" \
    "vfio-and-switchdev.toml"


def test_switchdev_comes_back_with_its_representors_and_vfs_bound_once(make_node):
    root, k = make_node(SWITCHDEV, "sw")
    # An operator had swapped two representors' names: udev will not give them back by itself.
    # Each rename away from a udev-given name leaves it as an altname (udev's policy), which the
    # kernel refuses as a new name until it is deleted: the operator deleted it, as the daemon must.
    for old, new in (("enp129s0f0np0_0", "tmpname"), ("enp129s0f0np0_1", "enp129s0f0np0_0"),
                     ("tmpname", "enp129s0f0np0_1")):
        k.call("nl_set_link", name=old, change={"name": new, "up": False})
        if old != "tmpname":
            assert k.call("state")["altnames"] == {new: [old]}
            k.call("nl_del_altname", name=new, altname=old)
    k.call("nl_set_link", name="enp129s0f0np0_2", change={"mtu": 9000})
    before = k.call("state")
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    after = k.call("state")
    assert_restored(before, after)
    pf = after["pfs"]["0000:81:00.0"]
    assert pf["eswitch"] == "switchdev" and len(pf["representors"]) == 4
    assert pf["representors"]["0"]["name"] == "enp129s0f0np0_1"
    assert pf["representors"]["2"]["mtu"] == 9000
    assert after["altnames"] == {}  # the swap removed the altnames udev's policy left on the way
    binds = binds_since_reload(root)
    assert all(binds.get(vf["pci"]) == 1 for vf in pf["vfs"].values())


@pytest.mark.parametrize("name", ["upgrade-50vf-eth", "dgx-ib-8x8"])
def test_sim_run_restores_every_vf_of_the_shared_scenarios(name, tmp_path):
    """Acceptance: outcome ready, every VF in state_after as in state_before (admin settings on the
    PF and what each VF's own netdev has), VF 16 of the 50-VF node, which appears late, included."""
    from .test_lifecycle import SHARED, sim_run

    doc = sim_run(SHARED / f"{name}.toml", tmp_path)
    assert doc["outcome"] == "ready" and doc["reloaded"] is True
    assert doc["vfs"]["restored"] == doc["vfs"]["total"] and doc["vfs"]["failed"] == []
    assert_restored(doc["state_before"], doc["state_after"])
    if name == "upgrade-50vf-eth":
        vf16 = doc["state_after"]["pfs"]["0000:01:00.0"]["vfs"]["16"]
        assert vf16["netdev"] == "enp1s0f0v16" and vf16["netdev_mac"] == vf16["mac"]
    assert doc["restore_s"] is not None and doc["restore_limit_s"] > 0


class _IgnoresTrust:
    """A driver that accepts `trust` and silently keeps the old value (as mlx5 did with a port
    GUID beside a node GUID): only reading back can tell."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_vf(self, pf, vf, change):
        from dataclasses import replace
        if change.trust is not None:
            change = replace(change, trust=None)
        if not change.is_empty():
            self.inner.set_vf(pf, vf, change)

    def set_vfs(self, pf, changes):
        for vf, change in changes.items():
            self.set_vf(pf, vf, change)


def test_a_setting_the_kernel_accepted_but_did_not_keep_fails_that_vf_by_name(tiny):
    import threading

    import structlog

    from mofed_lifecycle.sim.admin import set_vf
    from mofed_lifecycle.sim.seam import open_sim_node as open_node
    from mofed_lifecycle.sriov.restore import restore
    from mofed_lifecycle.sriov.snapshot import take_snapshot

    root, k = tiny
    node = open_node(root)
    try:
        snap = take_snapshot(node.paths, node.netlink)
        set_vf(root, "0000:08:00.0", 0, ["trust=off", "vlan=5"])  # drift to undo
        node.netlink = _IgnoresTrust(node.netlink)
        result = restore(node, snap, deadline_s=20, workers=4, stop=threading.Event(),
                         log=structlog.get_logger())
    finally:
        node.close()
    vf0 = k.call("state")["pfs"]["0000:08:00.0"]["vfs"]["0"]
    assert vf0["vlan"] == 0 and vf0["trust"] is False  # VLAN back; trust really not kept
    assert "trust True (reads False)" in result.failed["0000:08:00.2"]
    assert set(result.failed) == {"0000:08:00.2"}


def test_a_probe_that_never_ends_holds_its_writer_not_the_restore_and_a_restart_finishes(
        make_node):
    """A kernel that probes one VF at a time (probe_parallel 1) with VF 0's probe far past the
    deadline: every VF queued behind it misses the deadline too. The run still ends at its
    deadline (the bind writes are left in the kernel), names the VFs it could not restore, and
    the next start, once the probes have ended, restores every VF without another reload."""
    from .test_lifecycle import events

    stuck = SLOW.replace("late_vfs = { 1 = 250.0 }", "late_vfs = { 0 = 150.0 }").replace(
        "probe_parallel = 16", "probe_parallel = 1")
    root, k = make_node(stuck, "stuck")
    before = k.call("state")
    r = lifecycle(root, "--once", env={"VF_RESTORE_TIMEOUT_SEC": "1",
                                       "READY_ON_PARTIAL_RESTORE": "false"})
    assert r.returncode == 1, r.stderr[-2000:]
    # it ended while VF 0's probe was still running in the kernel (its write left there)
    assert k.call("state")["pfs"]["0000:3b:00.0"]["vfs"]["0"]["netdev"] is None
    not_restored = {e["vf"] for e in events(r.stderr) if e["event"] == "restore.vf_not_restored"}
    assert "0000:3b:00.2" in not_restored  # VF 0, the stuck probe, by PCI address
    assert len(not_restored) >= 2  # and VFs queued behind it in the one lane
    k.call("wait_settled", timeout=60)  # VF 0's probe ends; the queued ones run after it
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reload" not in journal_states(root)[-8:]
    assert_restored(before, k.call("state"))
