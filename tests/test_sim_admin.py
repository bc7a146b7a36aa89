"""`sim set`: an operator's or a failure's change of a running simulated node, through the CLI,
checked in the node's ground truth; bad input is refused with the reason, never a traceback."""

from __future__ import annotations

import json

import pytest

from mofed_lifecycle.sim.scenario import ScenarioError
from mofed_lifecycle.sim.scenario_parse import parse_scenario

from .test_lifecycle import STORAGE
from .test_no_harm import sim
from .test_sim_kernel import reload_driver

UPLINK = """
[node]
name = "uplink"
time_scale = 0.01
seed = 5
[driver]
loaded_version = "24.10-1.1.4"
installed_version = "25.07-0.9.7"
openibd_restart_s = 10
[host]
default_route = "enp8s0f0np0"
uplink_addresses = ["10.0.0.7/24"]
[[pf]]
pci = "0000:08:00.0"
name = "enp8s0f0np0"
numvfs = 2
fw = { num_of_vfs = 16, next_boot_num_of_vfs = 16, sriov_en = true }
"""


def set_(root, *what: str):
    return sim("set", "--root", str(root), *what)


def test_module_unload_and_load_as_an_operator_would(make_node):
    root, k = make_node(STORAGE, "mods")
    in_use = set_(root, "module-unload", "ib_core")
    assert in_use.returncode == 1 and "in use" in in_use.stderr.lower()
    assert "Traceback" not in in_use.stderr and "ib_core" in k.call("state")["modules"]
    r = set_(root, "module-unload", "nvme_rdma")
    assert r.returncode == 0, r.stderr
    assert "nvme_rdma" not in k.call("state")["modules"]
    # the installed nvme_rdma belongs to 25.07, the loaded stack is 24.10: the kernel says why
    stale = set_(root, "module-load", "nvme_rdma")
    assert stale.returncode == 1 and "disagrees about version of symbols" in stale.stderr
    missing = set_(root, "module-load", "no_such_module")
    assert missing.returncode == 1 and "no_such_module" in missing.stderr


def test_module_load_brings_a_module_and_its_dependencies(make_node):
    root, k = make_node(STORAGE.replace('loaded_version = "24.10-1.1.4"',
                                        'loaded_version = "25.07-0.9.7"'), "load")
    assert set_(root, "module-unload", "nvme_rdma").returncode == 0
    r = set_(root, "module-load", "nvme_rdma")
    assert r.returncode == 0 and json.loads(r.stdout)["loaded_now"] == ["nvme_rdma"]
    assert k.call("state")["modules"]["nvme_rdma"]["refcnt"] == 0


def test_the_default_route_and_its_addresses_go_with_the_reloaded_pf(make_node):
    root, k = make_node(UPLINK, "uplink")
    st = k.call("state")
    assert st["default_route"] == "enp8s0f0np0"
    assert st["pfs"]["0000:08:00.0"]["addresses"] == ["10.0.0.7/24"]
    reload_driver(root, k)  # openibd restart by hand: the PF netdev is destroyed and recreated
    st = k.call("state")
    assert st["default_route"] is None and st["pfs"]["0000:08:00.0"]["addresses"] == []
    r = set_(root, "route-default", "eno1")  # the onboard NIC, outside the simulated ones
    assert r.returncode == 0 and k.call("state")["default_route"] == "eno1"
    r = set_(root, "route-default", "none")
    assert r.returncode == 0 and k.call("state")["default_route"] is None


def test_fw_next_boot_numvfs_is_pending_beside_the_current_value(make_node):
    root, k = make_node(UPLINK, "fw")
    r = set_(root, "fw", "0000:08:00.0", "next_boot_numvfs=8")
    assert r.returncode == 0, r.stderr
    pf = k.call("state")["pfs"]["0000:08:00.0"]
    assert pf["fw"] == {"num_of_vfs": 16, "next_boot_num_of_vfs": 8, "sriov_en": True}
    assert (root / "sys/bus/pci/devices/0000:08:00.0/sriov_totalvfs").read_text().strip() == "16"


@pytest.mark.parametrize(("what", "expect"), [
    (["reboot"], "unknown change 'reboot'"),
    (["module-load"], "usage: sim set --root DIR module-load NAME"),
    (["fw", "0000:08:00.0", "numvfs=8"], "expected next_boot_numvfs=N"),
    (["fw", "0000:08:00.0", "next_boot_numvfs=-1"], "expected next_boot_numvfs=N"),
    (["fw", "0000:99:00.0", "next_boot_numvfs=8"], "no PF 0000:99:00.0"),
    (["fw", "0000:08:00.0", "next_boot_numvfs=300"], "the firmware takes 0..255"),
    (["fw", "0000:08:00.0", "next_boot_numvfs=\u00b2"], "expected next_boot_numvfs=N"),
    (["route-default", "bad/name"], "invalid interface name"),
])
def test_bad_changes_are_refused_with_the_reason(make_node, what, expect):
    root, k = make_node(UPLINK, "bad")
    before = k.call("state")
    r = set_(root, *what)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr
    assert k.call("state") == before


@pytest.mark.parametrize(("patch", "message"), [
    (("[host]\n", "[host]\nipv6 = true\n"), "unknown key 'ipv6' in [host]"),
    (('default_route = "enp8s0f0np0"', 'iommu = "DMA-FQ"'), "iommu: one of passthrough"),
    (('["10.0.0.7/24"]', '["10.0.0.300/24"]'), "is not an address/prefix"),
    (("sriov_en = true }", "sriov_en = true, num_vfs = 2 }"), "unknown key 'num_vfs' in fw"),
    (("num_of_vfs = 16,", "num_of_vfs = 1,"), "numvfs = 2 but the firmware allows 1"),
])
def test_host_and_fw_tables_are_checked_key_by_key(patch, message):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(UPLINK.replace(*patch), where="uplink.toml")
    assert message in str(e.value)
