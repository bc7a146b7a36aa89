"""`mofed-lifecycle doctor` on simulated nodes: each field misconfiguration named by its stable
id, with its evidence and fix; a clean node and the shared scenarios give none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import SCENARIOS, SHARED_SCENARIOS
from .inprocess import run_cli
from .test_lifecycle import lifecycle

BASE = """
[node]
name = "doc"
kernel = "5.15.0-91-generic"
time_scale = 0.01
seed = 15
[driver]
loaded_version = "25.07-0.9.7"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
{driver}
[host]
{host}
[[pf]]
pci = "0000:08:00.0"
name = "enp8s0f0np0"
numvfs = {numvfs}
{pf}
"""


def node(make_node, *, host: str = "", pf: str = "", driver: str = "", name: str = "node",
         numvfs: int = 8):
    return make_node(BASE.format(host=host, pf=pf, driver=driver, numvfs=numvfs), name)


def doctor(root: Path, *args: str) -> tuple[int, list[dict]]:
    r = run_cli(["doctor", "--root", str(root), "--json", *args])
    assert r.returncode in (0, 1), r.stderr
    findings = json.loads(r.stdout)["findings"]
    assert (r.returncode == 1) == bool(findings)
    for f in findings:  # every finding says what it read and what to do
        assert set(f) == {"id", "severity", "subject", "evidence", "fix"}
        assert f["fix"] and f["evidence"] and all(e["file"] and e["value"] for e in f["evidence"])
    return r.returncode, findings


def ids(findings: list[dict]) -> list[str]:
    return sorted(f["id"] for f in findings)


def test_a_clean_node_gives_no_finding(make_node):
    root, _k = node(make_node, host='iommu = "passthrough"\ngpus = 8')
    assert doctor(root) == (0, [])
    r = run_cli(["doctor", "--root", str(root)])
    assert r.stdout.startswith("doctor: no finding")


@pytest.mark.parametrize("path", sorted(SHARED_SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_the_shared_scenarios_give_no_finding(make_node, path):
    root, _k = make_node(path)
    assert doctor(root) == (0, [])


def test_iommu_translated_with_gpus_and_connectx(make_node):
    root, _k = node(make_node, host='iommu = "translated"\ngpus = 4')
    _rc, found = doctor(root)
    assert ids(found) == ["iommu-translated"]
    files = {e["file"] for e in found[0]["evidence"]}
    assert {"/sys/kernel/iommu_groups/0/type", "/var/log/dmesg", "/proc/cmdline"} <= files
    assert "iommu=pt" in found[0]["fix"]
    # without GPUs, a translated IOMMU breaks no GPUDirect RDMA
    root2, _k = node(make_node, host='iommu = "translated"\ngpus = 0', name="nogpu")
    assert doctor(root2) == (0, [])


def test_firmware_num_of_vfs_pending_until_a_cold_power_cycle(make_node):
    root, _k = node(make_node, pf="fw = { num_of_vfs = 16, next_boot_num_of_vfs = 8 }")
    _rc, found = doctor(root)
    assert ids(found) == ["fw-numvfs-pending"]
    assert found[0]["evidence"][0]["value"] == "NUM_OF_VFS current 16, next boot 8"
    assert "cold power cycle needed; a warm reboot does not apply it" in found[0]["fix"]
    root2, _k = node(make_node, pf="fw = { num_of_vfs = 8, next_boot_num_of_vfs = 8 }",
                     name="settled")
    assert doctor(root2) == (0, [])  # applied by a cold boot: nothing pending


def test_firmware_sriov_disabled(make_node):
    root, _k = node(make_node, numvfs=0, pf="fw = { num_of_vfs = 8, next_boot_num_of_vfs = 8, "
                    "sriov_en = false }")
    _rc, found = doctor(root)
    assert ids(found) == ["fw-sriov-disabled"] and "SRIOV_EN=1" in found[0]["fix"]


@pytest.mark.parametrize(("text", "expected", "words"), [
    ("{not json", ["rdma-dp-config-invalid"], "not valid JSON"),
    ('{"configList": [{"resourceName": "rdma_shared", "selectors": {}}]}',
     ["rdma-dp-config-invalid"], "selectors: {}"),
    ('{"configList": [{"resourceName": "r", "selectors": {"ifNames": ["mlx5_0", "mlx5_1"]}}]}',
     ["rdma-dp-config-invalid"], 'ifNames: ["mlx5_0", "mlx5_1"]'),
    ('{"configList": [{"resourceName": "r", "selectors": {"ifNames": ["ens1f0"]}}]}',
     ["rdma-dp-no-match"], "ens1f0"),
    ('{"configList": [{"resourceName": "r", "selectors": {"vendors": ["15b3"], '
     '"ifNames": ["enp8s0f0np0"]}}]}', [], ""),
])
def test_rdma_shared_device_plugin_configs_from_the_incident(make_node, tmp_path, text,
                                                           expected, words):
    root, _k = node(make_node)
    cfg = tmp_path / "config.json"
    cfg.write_text(text)
    _rc, found = doctor(root, "--rdma-config", str(cfg))
    assert ids(found) == expected
    if expected:
        assert words in found[0]["evidence"][0]["value"]
        assert found[0]["evidence"][0]["file"] == str(cfg)


def test_the_uplink_on_a_pf_a_reload_takes_down(make_node):
    root, _k = node(make_node, host='default_route = "enp8s0f0np0"\n'
                    'uplink_addresses = ["10.0.0.7/24"]')
    _rc, found = doctor(root)
    assert ids(found) == ["uplink-on-reloaded-pf"] and "UPLINK_POLICY" in found[0]["fix"]
    root2, _k = node(make_node, host='default_route = "eno1"', name="onboard")
    assert doctor(root2) == (0, [])  # the onboard NIC carries it: no reload touches it


def test_holders_peermem_in_use_and_storage(make_node):
    root, _k = make_node(SCENARIOS / "tiny-ib-holders.toml")
    _rc, found = doctor(root)
    assert ids(found) == ["peermem-in-use", "storage-holder"]
    third, _k = node(make_node, driver='extra_modules = [ { name = "irdma", holds = ["ib_core"] }'
                     ' ]', name="third")
    _rc, found = doctor(third)
    assert ids(found) == ["thirdparty-holder"] and "irdma (third-party) holds ib_core" in \
        found[0]["evidence"][0]["value"]
    assert "UNLOAD_THIRD_PARTY_RDMA_MODULES=true" in found[0]["fix"]
    # a holder no list knows (the daemon's preflight refuses it too): named, with its fix
    unknown, _k = node(make_node, driver='extra_modules = [ { name = "acme_rdma", holds = '
                       '["ib_core"] } ]', name="unknown")
    _rc, found = doctor(unknown)
    assert ids(found) == ["thirdparty-holder"] and found[0]["subject"] == "acme_rdma"
    assert "add it to the list it belongs to" in found[0]["fix"]


def test_what_a_killed_container_left_behind(make_node):
    root, _k = node(make_node)
    (root / "etc/modprobe.d/blacklist-ofed-modules.conf").write_text("blacklist mlx5_core\n")
    info = root / "proc/self/mountinfo"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text("99 1 0:42 /usr/src /run/mellanox/drivers/usr/src rw - none none rw\n")
    _rc, found = doctor(root)
    assert ids(found) == ["blacklist-leftover", "headers-mount-stale"]
    marker = root / "run/mellanox/drivers/.driver-ready"
    marker.write_text(json.dumps({"srcversions": {"mlx5_core": "0000DEADBEEF"}}) + "\n")
    _rc, found = doctor(root)  # (with a marker set, the headers are still being served)
    assert ids(found) == ["blacklist-leftover", "marker-stale"]


def test_the_inbox_driver_loaded_where_the_vendor_driver_ran(make_node):
    import os
    import subprocess

    text = BASE.format(host="", pf="", driver="", numvfs=8).replace(
        'loaded_version = "25.07-0.9.7"', 'loaded_version = "inbox"')
    root, _k = make_node(text)
    assert doctor(root) == (0, [])  # before any run (a fresh node): the inbox one is expected
    assert lifecycle(root, "--once").returncode == 0  # the vendor driver, ready once
    assert doctor(root) == (0, [])
    # someone puts the inbox driver back behind the lifecycle's back
    r = subprocess.run(["mlnxofedctl", "--alt-mods", "force-restart"], capture_output=True,
                       text=True, timeout=60,
                       env={**os.environ, "PATH": f"{root}/.sim/bin:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    _rc, found = doctor(root)
    assert ids(found) == ["inbox-driver-loaded", "marker-stale"]


def test_doctor_refuses_a_missing_rdma_config_in_one_line(tiny):
    root, _k = tiny
    r = run_cli(["doctor", "--root", str(root), "--rdma-config", "/nonexistent.json"])
    assert r.returncode == 2 and r.stderr.strip() == \
        "mofed-lifecycle: --rdma-config /nonexistent.json: no such file"


def test_fewer_vfs_in_firmware_than_the_saved_snapshot_wants_is_pending_too():
    from mofed_lifecycle.doctor.findings import NodeFacts, PfFirmware, diagnose

    f = NodeFacts(firmware=[PfFirmware("0000:08:00.0", (4, 4), (True, True), 8, "mstconfig")])
    found = diagnose(f)
    assert [x.id for x in found] == ["fw-numvfs-pending"]
    assert found[0].evidence[0]["value"] == "NUM_OF_VFS 4 < 8 VFs wanted"
    assert "set NUM_OF_VFS=8" in found[0].fix


def test_iommu_passthrough_on_the_command_line_is_no_finding():
    from mofed_lifecycle.doctor.findings import NodeFacts, diagnose
    from mofed_lifecycle.doctor.rdma_config import Device

    cx = [Device("0000:08:00.0", "15b3", "101d", "mlx5_core", ("enp8s0f0np0",), "ether")]
    f = NodeFacts(gpus=["0000:c0:00.0"], connectx=cx,
                  iommu_types=[("/sys/kernel/iommu_groups/3/type", "DMA-FQ")],
                  cmdline="ro quiet intel_iommu=on iommu=pt")
    assert diagnose(f) == []
    f.cmdline = "ro quiet intel_iommu=on"
    assert [x.id for x in diagnose(f)] == ["iommu-translated"]
    f.cmdline = "ro quiet iommu.passthrough=1"  # the generic spelling (arm64's too)
    assert diagnose(f) == []
    # fixed and rebooted: the groups are identity now, kern.log still has an earlier boot's line
    f = NodeFacts(gpus=["0000:c0:00.0"], connectx=cx,
                  iommu_types=[("/sys/kernel/iommu_groups/3/type", "identity")],
                  boot_domain=("/var/log/kern.log", "Default domain type: Translated"),
                  cmdline="ro quiet")
    assert diagnose(f) == []
    f.iommu_types, f.iommu_groups_readable = [], False  # the log is all there is to read
    assert [x.id for x in diagnose(f)] == ["iommu-translated"]


def test_the_daemon_logs_each_finding_once_and_shows_them_in_status_and_metrics(make_node):
    from .test_lifecycle import events

    root, _k = node(make_node, host='iommu = "translated"\ngpus = 2\ndefault_route = '
                    '"enp8s0f0np0"')
    r = lifecycle(root, "--once", env={"METRICS_TEXTFILE": "/run/metrics/m.prom"})
    assert r.returncode == 0, r.stderr[-2000:]
    said = [e for e in events(r.stderr) if e["event"] == "doctor.finding"]
    assert sorted(e["id"] for e in said) == ["iommu-translated", "uplink-on-reloaded-pf"]
    assert all(e["next"] and e["when"] == "start" for e in said)
    st = json.loads(run_cli(["status", "--root", str(root), "--json"]).stdout)
    assert sorted(f["id"] for f in st["doctor"]) == ["iommu-translated", "uplink-on-reloaded-pf"]
    text = (root / "run/metrics/m.prom").read_text()
    assert 'mofed_lifecycle_doctor_findings{id="iommu-translated",severity="error"} 1.0' in text
    assert "doctor       iommu-translated (iommu)" in run_cli(["status", "--root",
                                                                str(root)]).stdout


def test_the_readmes_doctor_output_is_what_doctor_prints(tmp_path):
    """README's "Diagnosing a node" shows doctor on the example broken node: kept true."""
    from mofed_lifecycle.sim.node import init_node, stop_kernel

    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    block = readme.split("paths shown as the node sees them):\n\n```\n", 1)[1].split("\n```", 1)[0]
    root = tmp_path / "broken"
    init_node(repo / "mofed_lifecycle/sim/examples/doctor-broken.toml", root)
    try:
        r = run_cli(["doctor", "--root", str(root), "--rdma-config",
                     "tests/scenarios/rdma-dp-bad.json"]) if Path.cwd() == repo else None
        if r is None:  # run from elsewhere: the same file by its absolute path
            r = run_cli(["doctor", "--root", str(root), "--rdma-config",
                         str(repo / "tests/scenarios/rdma-dp-bad.json")])
            block = block.replace("tests/scenarios/rdma-dp-bad.json",
                                  str(repo / "tests/scenarios/rdma-dp-bad.json"))
    finally:
        stop_kernel(root)
    assert r.returncode == 1
    assert r.stdout.rstrip().replace(str(root), "") == block


def test_sim_set_changes_the_host_between_runs_and_doctor_sees_it(make_node):
    root, _k = node(make_node, host='iommu = "passthrough"\ngpus = 2')
    assert doctor(root) == (0, [])
    r = run_cli(["sim", "set", "--root", str(root), "iommu", "translated"])
    assert r.returncode == 0, r.stderr
    assert ids(doctor(root)[1]) == ["iommu-translated"]
    assert run_cli(["sim", "set", "--root", str(root), "fw", "0000:08:00.0",
                    "next_boot_numvfs=4"]).returncode == 0
    assert ids(doctor(root)[1]) == ["fw-numvfs-pending", "iommu-translated"]
    assert run_cli(["sim", "set", "--root", str(root), "iommu", "passthrough"]).returncode == 0
    assert ids(doctor(root)[1]) == ["fw-numvfs-pending"]
    r = run_cli(["sim", "set", "--root", str(root), "iommu", "maybe"])
    assert r.returncode == 2 and "one of passthrough, translated, off" in r.stderr


def test_an_ipv6_only_default_route_is_seen_too(tmp_path):
    from mofed_lifecycle.doctor.uplink_path import default_route_dev
    from mofed_lifecycle.host.commands import Commands
    from mofed_lifecycle.host.node import Tools
    from mofed_lifecycle.host.paths import NodePaths

    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/route").write_text("Iface\tDestination\tGateway\n")
    (tmp_path / "proc/net/ipv6_route").write_text(
        "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp8s0f0np0\n"
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fd000000000000000000000000000001 00000400 00000001 00000000 00000003 enp8s0f0np0\n")
    tools = Tools(NodePaths.at(tmp_path), Commands({}))
    assert default_route_dev(tools) == "enp8s0f0np0"


def test_sriov_off_in_firmware_where_no_vf_is_wanted_is_no_finding(make_node):
    """A node that uses no SR-IOV (nothing saved, NUM_OF_VFS 0) may have it off."""
    root, _k = node(make_node, numvfs=0, pf="fw = { num_of_vfs = 0, next_boot_num_of_vfs = 0, "
                    "sriov_en = false }")
    assert doctor(root) == (0, [])


def test_a_firmware_value_mstconfig_cannot_say_is_unknown_not_zero(tmp_path):
    """`NUM_OF_VFS  N/A` (a field this firmware does not have) must not read as 0 VFs."""
    from mofed_lifecycle.doctor.gather import firmware
    from mofed_lifecycle.host.commands import Commands
    from mofed_lifecycle.host.node import Tools
    from mofed_lifecycle.host.paths import NodePaths

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "mstconfig"
    tool.write_text("#!/bin/sh\necho 'Configurations:   Default   Current   Next Boot'\n"
                    "echo '        NUM_OF_VFS    N/A    N/A    N/A'\n"
                    "echo '*       SRIOV_EN      True(1)    False(0)    True(1)'\n")
    tool.chmod(0o755)
    pf = tmp_path / "sys/bus/pci/devices/0000:08:00.0"
    pf.mkdir(parents=True)
    (pf / "sriov_numvfs").write_text("4\n")
    tools = Tools(NodePaths.at(tmp_path), Commands({"PATH": f"{bin_dir}:/usr/bin:/bin"}))
    [fw] = firmware(tools, {"0000:08:00.0": pf}, {})
    assert fw.num_vfs is None and fw.sriov_en == (False, True) and fw.wanted_vfs == 4


def test_an_uplink_vlan_on_the_pf_is_named_as_what_restore_cannot_bring_back():
    from mofed_lifecycle.doctor.findings import NodeFacts, diagnose
    from mofed_lifecycle.doctor.uplink_path import UplinkPath

    f = NodeFacts(uplink=UplinkPath("p0.10", {"p0": "0000:08:00.0"}, ("p0.10",),
                                    "/proc/net/ipv6_route"))
    [found] = diagnose(f)
    assert found.id == "uplink-on-reloaded-pf" and found.subject == "p0"
    assert found.evidence[0] == {"file": "/proc/net/ipv6_route",
                                 "value": "default route on p0.10 over p0 (PF 0000:08:00.0)"}
    assert "UPLINK_POLICY=restore refuses that reload" in found.fix


def test_sriov_en_pending_is_a_finding_only_where_it_matters():
    from mofed_lifecycle.doctor.findings import NodeFacts, PfFirmware, diagnose

    def found(sriov_en: tuple[bool, bool], wanted: int, num_vfs: tuple[int, int]) -> list[str]:
        fw = PfFirmware("0000:08:00.0", num_vfs, sriov_en, wanted, "mstconfig -e -d ... q")
        return [x.id for x in diagnose(NodeFacts(firmware=[fw]))]

    assert found((True, False), 0, (0, 0)) == []  # being turned off on a node that wants none
    assert found((True, False), 8, (8, 8)) == ["fw-sriov-disabled"]  # VFs lost at next boot
    assert found((False, True), 0, (0, 0)) == ["fw-sriov-disabled"]  # on, pending a cold cycle
    assert found((False, False), 0, (0, 0)) == []
    assert found((True, True), 8, (8, 8)) == []


def test_a_refusal_that_names_no_holder_makes_no_holder_finding(tmp_path):
    """preflight's "the holders of a, b form a cycle" (a module list read while it changed) is
    not a finding about a module called "the"."""
    from mofed_lifecycle.config import load_config
    from mofed_lifecycle.doctor.findings import diagnose
    from mofed_lifecycle.doctor.gather import gather
    from mofed_lifecycle.host.commands import Commands
    from mofed_lifecycle.host.modules import read_module_facts
    from mofed_lifecycle.host.node import Tools
    from mofed_lifecycle.host.paths import NodePaths
    from mofed_lifecycle.lifecycle.preflight import plan

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text(
        "mlx5_core 1 1 mlx5_vdpa, Live 0x0\nmlx5_vdpa 1 1 mlx5_fwctl, Live 0x0\n"
        "mlx5_fwctl 1 1 mlx5_vdpa, Live 0x0\n")
    config = load_config({"NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7"})
    facts = gather(Tools(NodePaths.at(tmp_path), Commands({})), config)
    assert facts.refusals == [] and plan(read_module_facts(NodePaths.at(tmp_path)), config
                                         ).refused.startswith("the holders of")
    assert not [f for f in diagnose(facts) if f.id.endswith("-holder")]
