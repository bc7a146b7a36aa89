"""The lifecycle does no harm: each test replays a path that once damaged a healthy node and checks
the node's ground truth (`sim state`, the kernel's timeline), never what the daemon says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mofed_lifecycle.host.netlink_types import VfChange, vf_infos
from mofed_lifecycle.sim.scenario_parse import parse_scenario

from .inprocess import run_cli
from .test_lifecycle import (
    JOURNAL,
    MARKER,
    STORAGE,
    events,
    journal_states,
    jsonl,
    lifecycle,
    wait_for,
)

SNAPSHOT = "run/mellanox/drivers/mofed-lifecycle/sriov-snapshot.json"

MATCHING = """
[node]
name = "matching"
kernel = "5.15.0-91-generic"
time_scale = 0.01
seed = 21
[driver]
loaded_version = "25.07-0.9.7"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
[udev]
netdev_delay_s = 0.3
[[pf]]
pci = "0000:08:00.0"
name = "enp8s0f0np0"
numvfs = 2
vf_name = "enp8s0f0v{vf}"
"""

PARTIAL = """
[node]
name = "partial"
kernel = "5.15.0-91-generic"
time_scale = 0.01
seed = 22
[driver]
loaded_version = "24.04-0.6.6"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
%s
[udev]
netdev_delay_s = 0.3
late_vfs = { 2 = 3000.0 }
probe_parallel = 16  # parallel probes: the late VF holds its own lane, not the others'
[[pf]]
pci = "0000:08:00.0"
name = "enp8s0f0np0"
numvfs = 3
vf_name = "enp8s0f0v{vf}"
vf.all = { trust = true }
vf.1 = { vlan = 100 }
"""


def sim(*args: str) -> subprocess.CompletedProcess:
    return run_cli(["sim", *args])


def reloads(root: Path) -> int:
    return sum(e["event"] == "openibd.unloaded" for e in jsonl(root / ".sim/timeline.jsonl"))


def vf(k, pf: str, index: int) -> dict:
    return k.call("state")["pfs"][pf]["vfs"][str(index)]


def test_nfsrdma_with_absent_ulps_never_reloads_a_matching_node_over_five_starts(make_node):
    root, k = make_node(MATCHING, "nfs")
    env = {"ENABLE_NFSRDMA": "true"}
    for _ in range(5):
        r = lifecycle(root, "--once", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    assert reloads(root) == 0
    st = k.call("state")
    assert st["pfs"]["0000:08:00.0"]["numvfs"] == 2 and st["markers"][MARKER]
    decision = next(e for e in events(r.stderr) if e["event"] == "decision")
    assert decision["reload"] is False


def test_a_stale_ib_uverbs_from_another_build_is_reloaded_and_recorded_in_the_marker(make_node):
    text = MATCHING.replace('installed_version = "25.07-0.9.7"',
                            'installed_version = "25.07-0.9.7"\n'
                            'loaded = { ib_uverbs = "0123456789ABCDEF0123456" }')
    root, k = make_node(text, "uverbs")
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    why = next(e for e in events(r.stderr) if e["event"] == "decision")["why"]
    assert "ib_uverbs srcversion 0123456789ABCDEF0123456 loaded ≠" in why
    assert reloads(root) == 1
    sc = parse_scenario(text)
    st = k.call("state")
    assert st["modules"]["ib_uverbs"]["srcversion"] == sc.installed_srcversion("ib_uverbs")
    marker = json.loads((root / MARKER).read_text())
    assert marker["srcversions"]["ib_uverbs"] == sc.installed_srcversion("ib_uverbs")
    assert marker["reloaded"] is True
    # the next start reloads nothing, and its marker says so
    r = lifecycle(root, "--once")
    assert r.returncode == 0 and reloads(root) == 1
    assert json.loads((root / MARKER).read_text())["reloaded"] is False


def test_after_a_partial_restore_a_plain_restart_never_reverts_what_an_admin_changed(make_node):
    root, k = make_node(PARTIAL % "", "partial")
    pf = "0000:08:00.0"
    env = {"READY_ON_PARTIAL_RESTORE": "true", "VF_RESTORE_TIMEOUT_SEC": "1"}
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert vf(k, pf, 1)["vlan"] == 100  # restored
    # the administrator changes VF 1 after the run (`ip link set PF vf 1 vlan 900 trust off`)
    admin = sim("set-vf", "--root", str(root), pf, "1", "vlan=900", "trust=off")
    assert admin.returncode == 0, admin.stderr
    bad = sim("set-vf", "--root", str(root), pf, "1", "vlan=x")
    assert bad.returncode == 2 and "vlan=x" in bad.stderr and "Traceback" not in bad.stderr
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert reloads(root) == 1
    after = vf(k, pf, 1)
    assert after["vlan"] == 900 and after["trust"] is False  # never overwritten
    started = next(e for e in events(r.stderr) if e["event"] == "restore.started")
    assert started["vfs"] == 1 and started["already_restored"] == 2  # only VF 2 is still owed


def test_a_refused_reload_keeps_no_snapshot_and_settings_changed_meanwhile_survive(make_node):
    holder = 'extra_modules = [ { name = "nvme_rdma", holds = ["ib_core"] } ]'
    root, k = make_node((PARTIAL % holder).replace("late_vfs = { 2 = 3000.0 }", ""), "refused")
    pf = "0000:08:00.0"
    r = lifecycle(root, "--once")
    assert r.returncode == 1 and "refused" in journal_states(root)
    assert not (root / SNAPSHOT).exists()  # a refusal keeps no snapshot
    admin = sim("set-vf", "--root", str(root), pf, "1", "vlan=900")  # while it was refused
    assert admin.returncode == 0, admin.stderr
    r = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "true"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert reloads(root) == 1
    st = k.call("state")
    assert st["pfs"][pf]["numvfs"] == 3 and vf(k, pf, 1)["vlan"] == 900
    assert "nvme_rdma" in st["modules"]


def test_a_refusal_names_every_holder_at_once(make_node):
    holders = ('extra_modules = [ { name = "nvme_rdma", holds = ["ib_core"] }, '
               '{ name = "ib_srp", holds = ["ib_core"] }, '
               '{ name = "bnxt_re", holds = ["ib_core"] } ]')
    root, _k = make_node((PARTIAL % holders).replace("late_vfs = { 2 = 3000.0 }", ""), "holders")
    r = lifecycle(root, "--once")
    assert r.returncode == 1
    refused = next(e for e in events(r.stderr) if e["event"] == "reload.refused")
    for m in ("nvme_rdma", "ib_srp", "bnxt_re"):
        assert m in refused["reason"], m
    status = json.loads((root / JOURNAL).with_name("status.json").read_text())
    assert all(m in status["reason"] for m in ("nvme_rdma", "ib_srp", "bnxt_re"))


def test_a_failed_swap_leaves_exactly_the_modules_the_node_had(make_node):
    """Item 4: what the swap unloaded is loaded back when openibd fails, and nothing else: a ULP
    the operator had taken down before the run (`sim set module-unload`) stays down."""
    root, k = make_node(STORAGE.replace("openibd_restart_s = 20", "openibd_restart_s = 3000"),
                        "unwind")
    down = sim("set", "--root", str(root), "module-unload", "nvme_rdma")
    assert down.returncode == 0, down.stderr
    before = k.call("state")["modules"]
    r = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "1", "OPENIBD_TIMEOUT_SEC": "0.5",
                                       "OPENIBD_ATTEMPTS": "1"})
    assert r.returncode == 1 and "reload" in journal_states(root)
    after = k.call("state")
    # openibd was killed half-way (its stack unloaded): the stack, mlx5_fwctl and the VFs come
    # back; nvme_rdma, down before the run, stays down
    assert sorted(after["modules"]) == sorted(before)
    assert after["blacklist_files"] == [] and not after["markers"][MARKER]
    pf = after["pfs"]["0000:18:00.0"]
    assert pf["numvfs"] == 2 and all(v["netdev"] for v in pf["vfs"].values())
    unwound = next(e for e in events(r.stderr) if e["event"] == "swap.unwound")
    assert unwound["not_reloaded"] == [] and unwound["vfs"].startswith("restored")
    status = json.loads((root / JOURNAL).with_name("status.json").read_text())
    assert "did not finish" in status["last_error"] and "VFs restored" in status["last_error"]


PEERMEM = MATCHING.replace('name = "matching"', 'name = "peermem-noop"') + """
[gpu]
peermem_start_s = 0.0
peermem_ko = "matching"
peermem_loaded = false
"""


def test_a_restart_with_nothing_to_reload_causes_no_module_event_beside_a_watching_loader(
        make_node):
    root, k = make_node(PEERMEM, "noop")
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7"}
    loader = subprocess.Popen([sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json",
                               "peermem", "--root", str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "nvidia_peermem" in k.call("state")["modules"], "nvidia_peermem loaded")
        before = len(jsonl(root / ".sim/timeline.jsonl"))
        r = lifecycle(root, "--once")
        assert r.returncode == 0, r.stderr[-2000:]
        r = lifecycle(root, "--once")  # and once more
        assert r.returncode == 0, r.stderr[-2000:]
        loader.send_signal(signal.SIGTERM)
        loader.communicate(timeout=30)
    finally:
        loader.kill()
    after = jsonl(root / ".sim/timeline.jsonl")[before:]
    assert [e for e in after if e["event"].startswith(("module.", "openibd."))] == []
    assert "nvidia_peermem" in k.call("state")["modules"]


# ---- SIGKILL at every state boundary, then a restart: every VF field and module as before --------

ETH_KILL = PARTIAL.replace("late_vfs = { 2 = 3000.0 }", "") % "" + """
vf.0 = { mac = "02:00:00:00:08:00", spoofchk = false, link_state = "enable", max_tx_rate = 500 }
vf.2 = { qos = 2, vlan = 7, mtu = 9000 }
"""
# the 2-VF IB node with a storage ULP and an aux module of test_lifecycle, plus explicit GUIDs
IB_KILL = STORAGE + ('vf.1 = { node_guid = "00:11:22:33:44:55:66:01", '
                     'port_guid = "00:11:22:33:44:55:77:01" }\n')
VF_FIELDS = ("pci", "driver", "netdev", "mac", "netdev_mac", "vlan", "qos", "trust", "spoofchk",
             "link_state", "min_tx_rate", "max_tx_rate", "mtu", "up", "node_guid", "port_guid")
KILL_AT = ["inspect", "decide", "preflight", "snapshot", "blacklist", "unload-aux", "reload",
           "reload-aux", "unblacklist", "restore", "mount-headers", "ready", "serve"]


def vf_fields(state: dict) -> dict:
    return {pci: {i: {f: v.get(f) for f in VF_FIELDS if f in v} for i, v in pf["vfs"].items()}
            for pci, pf in state["pfs"].items()}


@pytest.mark.parametrize("kind", ["eth", "ib"])
@pytest.mark.parametrize("state", KILL_AT)
def test_killed_at_any_boundary_the_restart_brings_every_vf_field_and_module_back(
        make_node, kind, state):
    text = ETH_KILL if kind == "eth" else IB_KILL
    root, k = make_node(text, f"{kind}-{state}")
    before = k.call("state")
    env = {"UNLOAD_STORAGE_MODULES": "true"}
    r = lifecycle(root, "--once", env={**env, "MOFED_LIFECYCLE_CRASH_AT": state})
    assert r.returncode == -signal.SIGKILL
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    after = k.call("state")
    assert vf_fields(after) == vf_fields(before)
    sc = parse_scenario(text)
    assert set(after["modules"]) >= set(before["modules"])  # nothing left unloaded
    for m, info in after["modules"].items():
        if m in sc.installed or m in ("mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs"):
            assert info["srcversion"] == sc.installed_srcversion(m), m
    assert after["blacklist_files"] == [] and after["markers"][MARKER]


def test_vf_infos_send_the_port_guid_in_a_vf_info_of_its_own():
    both = VfChange(trust=True, node_guid="00:00:00:00:00:00:00:01",
                    port_guid="00:00:00:00:00:00:00:02")
    assert vf_infos(both) == [VfChange(trust=True, node_guid="00:00:00:00:00:00:00:01"),
                              VfChange(port_guid="00:00:00:00:00:00:00:02")]
    assert vf_infos(VfChange(vlan=3)) == [VfChange(vlan=3)]
    assert vf_infos(VfChange()) == []


def test_an_ib_restore_brings_back_distinct_node_and_port_guids_on_every_vf(make_node):
    text = IB_KILL.replace("numvfs = 2", "numvfs = 6") + "".join(
        f'vf.{i} = {{ node_guid = "02:00:00:00:00:00:{i:02x}:01", '
        f'port_guid = "02:00:00:00:00:00:{i:02x}:02" }}\n' for i in (0, 2, 3, 4, 5))
    root, k = make_node(text, "ib-guids")
    before = k.call("state")["pfs"]["0000:18:00.0"]["vfs"]
    r = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "true"})
    assert r.returncode == 0, r.stderr[-2000:]
    after = k.call("state")["pfs"]["0000:18:00.0"]["vfs"]
    assert len(after) == 6
    for i, v in before.items():
        assert v["node_guid"] != v["port_guid"]
        for key in ("node_guid", "port_guid", "netdev_node_guid", "netdev_port_guid"):
            assert after[i][key] == v[key], (i, key)


@pytest.mark.parametrize("bad, key", [
    (("late_vfs = { 2 = 3000.0 }", "late_vf = { 2 = 3000.0 }"), "late_vf"),
    (("openibd_restart_s = 20", "openibd_restart_sec = 20"), "openibd_restart_sec"),
    (('vf_name = "enp8s0f0v{vf}"', 'vf_name = "enp8s0f0v{vf}"\nrole = "uplink"'), "role"),
])
def test_a_misspelled_scenario_key_is_refused_by_name(tmp_path, bad, key):
    path = tmp_path / "bad.toml"
    path.write_text((PARTIAL % "").replace(*bad))
    r = subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "sim", "init", str(path),
                        "--root", str(tmp_path / "root")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert f"unknown key {key!r}" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_status_after_a_once_exit_does_not_claim_a_running_daemon(make_node):
    root, _k = make_node(MATCHING, "once-status")
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7"}
    out = subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "status", "--root",
                          str(root)], env=env, capture_output=True, text=True, timeout=60)
    state_line = next(x for x in out.stdout.splitlines() if x.startswith("state"))
    assert "serve" in state_line and "the daemon is not running" in state_line
    st = json.loads(subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "status",
                                    "--root", str(root), "--json"], env=env,
                                   capture_output=True, text=True, timeout=60).stdout)
    assert st["running"] is False and st["vfs"]["restored"] is None  # nothing restored this run


def test_a_vf_with_an_explicit_all_zero_mac_gets_a_random_netdev_mac_and_counts_restored(tmp_path):
    """Item 8: mlx5 gives a VF whose admin MAC is all zero a random netdev MAC at every probe;
    that VF is restored when everything else is as it was (its netdev MAC cannot be)."""
    from .test_lifecycle import sim_run

    path = tmp_path / "zero-mac.toml"
    path.write_text(PARTIAL.replace("late_vfs = { 2 = 3000.0 }", "") % ""
                    + 'vf.2 = { mac = "00:00:00:00:00:00", vlan = 3 }\n')
    doc = sim_run(path, tmp_path)
    before = doc["state_before"]["pfs"]["0000:08:00.0"]["vfs"]["2"]
    after = doc["state_after"]["pfs"]["0000:08:00.0"]["vfs"]["2"]
    assert before["mac"] == after["mac"] == "00:00:00:00:00:00" and after["vlan"] == 3
    assert after["netdev_mac"] not in (None, "00:00:00:00:00:00", before["netdev_mac"])
    assert int(after["netdev_mac"][:2], 16) & 3 == 2  # locally administered unicast
    assert doc["outcome"] == "ready" and doc["vfs"]["restored"] == doc["vfs"]["total"] == 3


def test_a_swap_that_failed_before_openibd_unloaded_anything_never_rewrites_the_live_vfs(
        make_node):
    """Review finding: after a failed swap the VFs are restored only where the reload destroyed
    them. Here openibd keeps failing "in use" before unloading anything: the PF keeps its netdev
    (same ifindex), so a VLAN an administrator set during the retries is never reverted."""
    text = STORAGE.replace("openibd_restart_s = 20", "openibd_restart_s = 20\nopenibd_failures = 9")
    root, k = make_node(text, "busy")
    before = {m: v["srcversion"] for m, v in k.call("state")["modules"].items()}
    proc = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "1", "OPENIBD_ATTEMPTS": "4"},
                     wait=False)
    try:
        wait_for(lambda: (root / JOURNAL).exists()
                 and json.loads((root / JOURNAL).read_text()).get("state") == "reload",
                 "the reload to be retried")
        admin = sim("set-vf", "--root", str(root), "0000:18:00.0", "1", "vlan=900")
        assert admin.returncode == 0, admin.stderr
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    st = k.call("state")
    assert vf(k, "0000:18:00.0", 1)["vlan"] == 900  # the administrator's change stands
    assert reloads(root) == 0 and st["pfs"]["0000:18:00.0"]["numvfs"] == 2
    evs = events(err)
    assert any(e["event"] == "restore.pf_untouched" for e in evs)
    assert not any(e["event"] == "vf.set" for e in jsonl(root / ".sim/timeline.jsonl")
                   if e.get("changed", {}).get("vlan") == 0)
    assert next(e for e in evs if e["event"] == "swap.unwound")["not_reloaded"] == []
    # the holders unloaded for the swap came back from the host's tree (the installed build
    # does not fit the old stack that is still loaded): the very builds that were loaded
    assert {m: v["srcversion"] for m, v in st["modules"].items()} == before
    assert {e["module"] for e in evs if e["event"] == "module.loaded_from_host"} == {
        "nvme_rdma", "mlx5_fwctl"}
