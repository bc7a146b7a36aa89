"""`sim run`'s restore figures: measured by the simulator from its kernel timeline and ground truth.

The measurement functions (`sim/report.py`) are pure: most tests feed them synthetic timelines and
states. The simulated kernel's own notes (`vf.set`, `link.set`, `pci.bound`...) are checked on a
real node, and a real `sim run` checks the report's keys and types. No wall-clock value is asserted.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mofed_lifecycle.sim import run as simrun
from mofed_lifecycle.sim.floor import probe_floor
from mofed_lifecycle.sim.report import (
    compare_vfs,
    measure_restore,
    ratio,
    restore_lines,
)

from .conftest import SCENARIOS

PF, PF2 = "0000:01:00.0", "0000:02:00.0"


def vf(pci: str, name: str, mac: str = "02:00:00:00:00:01", **kw: Any) -> dict[str, Any]:
    entry = {"pci": pci, "driver": "mlx5_core", "netdev": name, "mac": mac, "netdev_mac": mac,
             "trust": False, "spoofchk": True, "link_state": "auto", "vlan": 0, "qos": 0,
             "min_tx_rate": 0, "max_tx_rate": 0, "mtu": 1500, "up": True}
    entry.update(kw)
    return entry


def state(pfs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """A ground truth with only what the measurement reads: {PF PCI: {VF index: entry}}."""
    return {"pfs": {pci: {"name": f"pf{i}", "vfs": {str(k): v for k, v in vfs.items()}}
                    for i, (pci, vfs) in enumerate(pfs.items())}}


BEFORE = state({
    PF: {0: vf("0000:01:00.2", "p0v0"), 1: vf("0000:01:00.3", "p0v1", vlan=100)},
    PF2: {0: vf("0000:02:00.2", "p1v0", mac="02:00:00:00:02:00")},
})


def ev(t: float, event: str, **fields: Any) -> dict[str, Any]:
    return {"t": t, "event": event, **fields}


def reload_timeline(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Driver reload: VFs gone at 1.0, driver loaded at 2.0, PFs back at 2.3 / 2.6 (named)."""
    rows = [
        ev(0.9, "vf.set", pf=PF, vf=0, pci="0000:01:00.2", changed={}),  # before: not counted
        ev(1.0, "netdev.removed", name="p0v0", pci="0000:01:00.2"),
        ev(1.01, "netdev.removed", name="p0v1", pci="0000:01:00.3"),
        ev(1.02, "sriov.numvfs", pf=PF, numvfs=0),
        ev(1.03, "netdev.removed", name="pf0", pci=PF),
        ev(1.05, "openibd.unloaded", modules=["mlx5_core"]),
        ev(2.0, "openibd.loaded", version="25.10"),
        ev(2.2, "netdev.appeared", name="eth0", pci=PF),
        ev(2.3, "netdev.named", name="pf0", old="eth0", pci=PF),
        ev(2.5, "netdev.appeared", name="eth1", pci=PF2),
        ev(2.6, "netdev.named", name="pf1", old="eth1", pci=PF2),
        ev(2.7, "sriov.numvfs", pf=PF, numvfs=2, autoprobe=False),
        ev(2.71, "vf.set", pf=PF, vf=0, pci="0000:01:00.2", changed={"mac": "02:00:00:00:00:01"}),
        ev(2.72, "pci.bound", pci="0000:01:00.2", driver="mlx5_core"),
        ev(2.73, "pci.bound", pci="0000:01:00.3", driver="mlx5_core"),
        ev(2.74, "pci.bound", pci="0000:02:00.2", driver="mlx5_core"),
        ev(3.5, "netdev.appeared", name="eth2", pci="0000:01:00.2"),
        ev(3.6, "netdev.named", name="p0v0", old="eth2", pci="0000:01:00.2"),
        ev(3.9, "link.set", name="p0v0", pci="0000:01:00.2", changed={"up": True}),
    ]
    return sorted(rows + (extra or []), key=lambda r: r["t"])


# ---- which VFs are back --------------------------------------------------------------------------

def test_identical_states_restore_every_vf():
    got = compare_vfs(BEFORE, copy.deepcopy(BEFORE))
    assert got == {"total": 3, "restored": 3, "failed": []}


def test_a_vf_differing_in_any_field_or_missing_is_failed_by_pci_sorted():
    after = copy.deepcopy(BEFORE)
    after["pfs"][PF2]["vfs"]["0"].update(netdev_mac="02:aa:00:00:00:00", up=False)
    after["pfs"][PF]["vfs"]["1"]["vlan"] = 0
    del after["pfs"][PF]["vfs"]["0"]
    got = compare_vfs(BEFORE, after)
    assert got["total"] == 3 and got["restored"] == 0
    assert [f["pci"] for f in got["failed"]] == ["0000:01:00.2", "0000:01:00.3", "0000:02:00.2"]
    assert got["failed"][0] == {"pci": "0000:01:00.2", "pf": PF, "index": 0,
                                "differs": ["missing"]}
    assert got["failed"][1]["differs"] == ["vlan"]
    assert got["failed"][2] == {"pci": "0000:02:00.2", "pf": PF2, "index": 0,
                                "differs": ["netdev_mac", "up"]}


def test_ib_guids_on_the_netdev_count():
    before = state({PF: {0: {"pci": "0000:01:00.2", "node_guid": "00:11:22:33:44:55:66:77",
                                 "netdev_node_guid": "00:11:22:33:44:55:66:77"}}})
    after = copy.deepcopy(before)
    after["pfs"][PF]["vfs"]["0"]["netdev_node_guid"] = "aa:bb:cc:dd:ee:ff:00:11"
    assert compare_vfs(before, after)["failed"][0]["differs"] == ["netdev_node_guid"]


# ---- restore_s and disruption_s from the timeline ---------------------------------------------

def test_restore_runs_from_the_first_pf_back_to_the_last_event_on_a_restored_vf():
    after = copy.deepcopy(BEFORE)
    after["pfs"][PF]["vfs"]["1"]["up"] = False  # VF 1 is not back: its events do not count
    late = [ev(4.5, "link.set", name="p0v1", pci="0000:01:00.3", changed={"mtu": 9000}),
            ev(4.0, "netdev.named", name="p1v0", old="eth3", pci="0000:02:00.2"),
            ev(4.8, "vf.set", pf=PF2, vf=0, pci="0000:02:00.2", changed={})]  # no-op: ignored
    m = measure_restore(reload_timeline(late), BEFORE, after)
    assert m["reloaded"] is True
    assert m["vfs"]["restored"] == 2 and [f["pci"] for f in m["vfs"]["failed"]] == ["0000:01:00.3"]
    assert m["marks"]["pf_back_s"] == 2.3 and m["marks"]["pf_back"] == {PF: 2.3, PF2: 2.6}
    assert m["marks"]["last_vf"] == {"pci": "0000:02:00.2", "event": "netdev.named"}
    assert m["restore_s"] == pytest.approx(4.0 - 2.3)
    assert m["disruption_s"] == pytest.approx(4.0 - 1.0)


def test_pf_back_is_when_it_appeared_when_udev_does_not_rename():
    rows = [r for r in reload_timeline() if not (r["event"] == "netdev.named" and r["pci"] == PF)]
    m = measure_restore(rows, BEFORE, copy.deepcopy(BEFORE))
    assert m["marks"]["pf_back"][PF] == 2.2 and m["restore_s"] == pytest.approx(3.9 - 2.2)


def test_no_vf_back_after_a_reload_gives_no_restore_time():
    after = state({PF: {}, PF2: {}})
    m = measure_restore(reload_timeline(), BEFORE, after)
    assert m["reloaded"] is True and m["vfs"]["restored"] == 0 and len(m["vfs"]["failed"]) == 3
    assert all(f["differs"] == ["missing"] for f in m["vfs"]["failed"])
    assert m["restore_s"] is None and m["disruption_s"] is None
    assert m["marks"]["vfs_gone_s"] == 1.0


def test_vfs_without_netdevs_are_gone_when_numvfs_drops_to_zero():
    rows = [r for r in reload_timeline() if r["event"] != "netdev.removed" or r["pci"] == PF]
    m = measure_restore(rows, BEFORE, copy.deepcopy(BEFORE))
    assert m["marks"]["vfs_gone_s"] == 1.02


def test_nothing_reloaded_and_nothing_touched_gives_none():
    rows = [ev(0.1, "vf.set", pf=PF, vf=0, pci="0000:01:00.2", changed={}),
            ev(0.2, "link.set", name="p0v0", pci="0000:01:00.2", changed={})]
    m = measure_restore(rows, BEFORE, copy.deepcopy(BEFORE))
    assert m["reloaded"] is False and m["vfs"]["restored"] == 3
    assert m["restore_s"] is None and m["disruption_s"] is None


def test_without_a_reload_a_touched_vf_counts_from_the_runs_start():
    rows = [ev(0.4, "link.set", name="p0v0", pci="0000:01:00.2", changed={"mtu": 1500})]
    m = measure_restore(rows, BEFORE, copy.deepcopy(BEFORE))
    assert m["restore_s"] == pytest.approx(0.4) and m["disruption_s"] is None


def test_the_node_floor_schedules_each_pfs_probes_from_its_own_return():
    # one VF per PF, lanes enough: each PF's own return + its probe + its rename
    jobs = {PF: [(0.9, 0.1)], PF2: [(0.8, 0.1)]}
    assert probe_floor(jobs, {PF: 2.3, PF2: 2.6}, 4) == pytest.approx(1.2)
    assert probe_floor(jobs, {PF: 2.3}, 4) == pytest.approx(1.0)  # PF2 never came back
    assert probe_floor(jobs, {}, 4) is None


def test_with_one_probe_lane_the_floor_is_the_sum_of_the_probes():
    jobs = {PF: [(0.5, 0.1), (0.3, 0.05), (0.2, 0.0)]}
    assert probe_floor(jobs, {PF: 0.0}, 1) == pytest.approx(1.0 + 0.0)  # longest first
    # two lanes: 0.5 on one, 0.3 then 0.2 on the other; the 0.5 probe's rename ends last
    assert probe_floor(jobs, {PF: 0.0}, 2) == pytest.approx(0.6)
    # lanes are shared by the PFs: the second PF's probe waits for a lane
    two = {PF: [(0.5, 0.0)], PF2: [(0.5, 0.0)]}
    assert probe_floor(two, {PF: 0.0, PF2: 0.1}, 1) == pytest.approx(1.0)
    assert probe_floor(two, {PF: 0.0, PF2: 0.1}, 2) == pytest.approx(0.6)


def test_in_vf_order_the_probes_land_where_a_lane_is_free_whatever_their_length():
    """What a restorer that cannot know the probe times can do at best (the benchmark's second
    floor): the short probes first put the long one last."""
    jobs = {PF: [(0.2, 0.0), (0.3, 0.0), (0.5, 0.0)]}
    assert probe_floor(jobs, {PF: 0.0}, 2, in_order=True) == pytest.approx(0.7)
    assert probe_floor(jobs, {PF: 0.0}, 2) == pytest.approx(0.5)  # longest first
    assert probe_floor(jobs, {PF: 0.0}, 1, in_order=True) == pytest.approx(1.0)  # one lane: same


def test_ratio_of_a_time_to_its_floor():
    assert ratio(1.29, 1.2) == pytest.approx(1.075) and ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None


def test_human_lines_name_each_figure_and_the_failed_vfs():
    r = {"reloaded": True, "restore_s": 0.129, "restore_limit_s": 0.1224, "restore_ratio": 1.054,
         "restore_limit_node_s": 0.1224, "disruption_s": 1.6,
         "vfs": {"total": 50, "restored": 49, "failed": [
             {"pci": "0000:01:02.3", "pf": PF, "index": 16, "differs": ["missing"]}]},
         "daemon": {"cpu_s": 0.5, "max_rss_mib": 40.0, "udev": "pyudev+umockdev"}}
    text = "\n".join(restore_lines(r))
    assert "restore_s 0.1290 vs floor 0.1224 (x1.05)" in text
    assert "VFs restored 49/50" in text and "VF 0000:01:02.3" in text and "missing" in text
    assert "disruption_s 1.6000" in text and "SR-IOV issue" not in text
    r.update(restore_s=None, restore_ratio=None, vfs={"total": 50, "restored": 0, "failed": [
        {"pci": f"0000:01:00.{i}", "pf": PF, "index": i, "differs": ["missing"]}
        for i in range(20)]})
    text = "\n".join(restore_lines(r))
    assert "restore_s -" in text and "... and 10 more" in text


# ---- the simulated kernel's notes ----------------------------------------------------------------

def timeline_events(root: Path) -> list[dict[str, Any]]:
    path = root / ".sim" / "timeline.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_kernel_notes_vf_settings_links_and_bindings(tiny):
    root, k = tiny
    pf, pf_dev, vf0 = "0000:08:00.0", "enp8s0f0np0", "0000:08:00.2"
    k.call("wait_settled", timeout=30)
    k.call("nl_set_vf", pf=pf_dev, vf=0, change={"mac": "02:00:00:00:08:10", "trust": True})
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{vf0}/driver/unbind", value=vf0)
    k.call("sysfs_write", path="sys/bus/pci/drivers/mlx5_core/bind", value=vf0)
    k.call("wait_settled", timeout=30)
    k.call("nl_set_link", name="enp8s0f0v0", change={"mtu": 4000, "up": True})
    k.call("nl_set_link", name="enp8s0f0v0", change={"mtu": 4000, "up": True})  # no-op
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{pf}/sriov_numvfs", value="0")
    rows = timeline_events(root)
    vf_set = [r for r in rows if r["event"] == "vf.set"]
    assert vf_set[-1] == {**vf_set[-1], "pf": pf, "vf": 0, "pci": vf0,
                          "changed": {"mac": "02:00:00:00:08:10"}}  # trust was already on
    assert {"event": "pci.unbound", "pci": vf0, "driver": "mlx5_core"}.items() <= next(
        r for r in rows if r["event"] == "pci.unbound").items()
    assert any(r["event"] == "pci.bound" and r["pci"] == vf0 for r in rows)
    *_, link, again = [r for r in rows if r["event"] == "link.set"]
    assert link["name"] == "enp8s0f0v0" and link["pci"] == vf0
    assert link["changed"] == {"mtu": 4000, "up": True}  # a freshly bound netdev starts down
    assert again["changed"] == {}
    assert any(r["event"] == "sriov.numvfs" and r["pf"] == pf and r["numvfs"] == 0 for r in rows)


# ---- a real `sim run` ----------------------------------------------------------------------------

REPORT_KEYS = {"restore_s", "disruption_s", "restore_limit_s", "restore_ratio", "vfs", "daemon",
               "restore_limit_node_s", "restore_ratio_node", "restore_marks"}


def _num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, float | int) and not isinstance(v, bool) and v >= 0)


def test_sim_run_report_has_the_restore_figures(tmp_path: Path):
    run = simrun.run_scenario(SCENARIOS / "tiny-eth.toml", root=tmp_path / "node")
    r = json.loads(json.dumps(run.report))  # what --report writes
    assert set(r) >= REPORT_KEYS, REPORT_KEYS - set(r)
    assert r["reloaded"] is True and r["outcome"] in ("ready", "failed", "timeout")
    vfs = r["vfs"]
    assert vfs["total"] == 4 and isinstance(vfs["restored"], int)
    assert vfs["restored"] + len(vfs["failed"]) == 4
    assert all(set(f) == {"pci", "pf", "index", "differs"} and f["differs"] for f in vfs["failed"])
    for key in ("restore_s", "disruption_s", "restore_ratio", "restore_limit_node_s"):
        assert _num_or_none(r[key]), (key, r[key])
    assert isinstance(r["restore_limit_s"], float) and r["restore_limit_s"] > 0
    if r["restore_s"] is not None:
        assert r["restore_ratio"] == pytest.approx(r["restore_s"] / r["restore_limit_s"], rel=1e-3)
    d = r["daemon"]
    assert isinstance(d["cpu_s"], float) and d["cpu_s"] > 0 and d["max_rss_mib"] > 1
    assert d["udev"] in ("pyudev+umockdev", "sim-stream")
    text = simrun.format_timeline(run)
    assert "restore_s " in text and f"VFs restored {vfs['restored']}/4" in text
    assert "lands with the SR-IOV issue" not in text


def test_a_lifecycle_past_its_timeout_is_stopped_and_still_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(simrun, "lifecycle_timeout_s", lambda sc, env: 0.0)
    run = simrun.run_scenario(SCENARIOS / "tiny-eth.toml", root=tmp_path / "node",
                              env_overrides={"MOFED_SIM_REPORT_TEST": "1"})
    assert run.report["outcome"] == "timeout" and run.report["exit_code"] is None
    assert isinstance(run.report["daemon"]["cpu_s"], float)


def test_wait4_reaps_with_a_deadline_and_reports_rusage():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert simrun._wait4(proc.pid, 0.05) is None  # still running
    finally:
        proc.kill()
    status, usage = simrun._wait4(proc.pid, 10)
    proc.returncode = -9
    assert status != 0 and usage.ru_maxrss > 0
