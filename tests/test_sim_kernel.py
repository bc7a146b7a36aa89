"""The simulated kernel behaves like the real one where a restore strategy depends on it.

Every test drives the running kernel process the way the daemon will: sysfs attribute writes,
netlink requests and the stand-in tools as real subprocesses; it then checks the node's files and
its ground truth. Waits are on the kernel's own "no event pending" answer, never on wall-clock
sleeps.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from mofed_lifecycle.sim.client import KernelClient, SimKernelError
from mofed_lifecycle.sim.kernel_thread import ThreadKernel
from mofed_lifecycle.sim.node import init_node, stop_kernel
from mofed_lifecycle.sim.scenario_parse import load_scenario

from .conftest import SCENARIOS, node_factory


@pytest.fixture
def make_node(tmp_path):
    """The kernel as its own process here: these tests signal it, wait for it, restart it."""
    yield from node_factory(tmp_path, in_thread=False)

PF = "0000:08:00.0"
PF_DEV = "enp8s0f0np0"


def tool(root: Path, name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    exe = root / "etc/init.d/openibd" if name == "openibd" else root / ".sim/bin" / name
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)


def numvfs_attr(root: Path) -> Path:
    return root / "sys/bus/pci/devices" / PF / "sriov_numvfs"


def blacklist(root: Path) -> None:
    (root / "etc/modprobe.d/blacklist-ofed-modules.conf").write_text(
        "".join(f"blacklist {m}\n" for m in ("mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs")))


def timeline(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / ".sim/timeline.jsonl").read_text().splitlines()]


def reload_driver(root: Path, k: KernelClient) -> None:
    blacklist(root)
    assert tool(root, "openibd", "restart").returncode == 0
    k.call("wait_settled", timeout=30)


# ---- SR-IOV ----------------------------------------------------------------------------------


def test_numvfs_change_between_nonzero_counts_is_ebusy(tiny):
    root, k = tiny
    assert numvfs_attr(root).read_text().strip() == "4"
    with pytest.raises(SimKernelError) as e:
        k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="8")
    assert e.value.errno == errno.EBUSY
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="4")  # same: no-op
    with pytest.raises(SimKernelError) as e:
        k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="200")
    assert e.value.errno == errno.ERANGE
    assert numvfs_attr(root).read_text().strip() == "4"


def test_numvfs_zero_removes_vfs_and_their_netdevs(tiny):
    root, k = tiny
    assert (root / "sys/class/net/enp8s0f0v0").exists()
    k.call("sysfs_write", path=f"sys/class/net/{PF_DEV}/device/sriov_numvfs", value="0")
    assert numvfs_attr(root).read_text().strip() == "0"
    assert not (root / "sys/class/net/enp8s0f0v0").exists()
    assert not list((root / "sys/bus/pci/devices" / PF).glob("virtfn*"))
    assert k.call("state")["pfs"][PF]["vfs"] == {}


def test_vf_netdev_appears_late_with_kernel_name_then_udev_renames_it(tiny):
    root, k = tiny
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
    start = time.time()
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="4")
    # Created at once: PCI functions and virtfn links; the netdevs come later (below).
    vf0 = root / "sys/bus/pci/devices" / PF / "virtfn0"
    assert os.readlink(vf0) == "../0000:08:00.2"
    k.call("wait_settled", timeout=30)
    sc = load_scenario(SCENARIOS / "tiny-eth.toml")
    events = [e for e in timeline(root) if e["t"] >= start]
    created = next(i for i, e in enumerate(events) if e["event"] == "sriov.numvfs"
                   and e["numvfs"] == 4)
    assert all(e["event"] != "netdev.appeared" for e in events[:created])
    for i in (0, 1, 3):
        pci = f"0000:08:00.{2 + i}"
        appeared = next(e for e in events if e["event"] == "netdev.appeared" and e["pci"] == pci)
        named = next(e for e in events if e["event"] == "netdev.named" and e["pci"] == pci)
        assert appeared["name"].startswith("eth")  # the kernel's name first...
        # ...then udev's
        assert named["name"] == f"enp8s0f0v{i}" and named["old"] == appeared["name"]
        # never earlier than the scenario says (scaled); VF 3 is the late one
        assert appeared["t"] - start >= sc.scaled(sc.netdev_delay_s(pci, i)) - 1e-3
        assert named["t"] - appeared["t"] >= sc.scaled(sc.rename_delay_s(pci, i)) - 1e-3
    assert sc.netdev_delay_s("0000:08:00.5", 3) == 6.0
    assert (root / "sys/class/net/enp8s0f0v3/device").resolve().name == "0000:08:00.5"
    assert not any((root / "sys/class/net").glob("eth*"))


def test_autoprobe_off_creates_unbound_vfs_until_bound(tiny):
    root, k = tiny
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe", value="0")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="2")
    k.call("wait_settled", timeout=30)
    vfs = k.call("state")["pfs"][PF]["vfs"]
    assert [v["driver"] for v in vfs.values()] == [None, None]
    assert [v["netdev"] for v in vfs.values()] == [None, None]
    k.call("sysfs_write", path="sys/bus/pci/drivers/mlx5_core/bind", value="0000:08:00.3")
    k.call("wait_settled", timeout=30)
    vf1 = k.call("state")["pfs"][PF]["vfs"]["1"]
    assert (vf1["driver"], vf1["netdev"]) == ("mlx5_core", "enp8s0f0v1")
    assert os.readlink(root / "sys/bus/pci/devices/0000:08:00.3/driver").endswith("mlx5_core")


def test_admin_mac_reaches_a_bound_vf_netdev_only_after_rebind(tiny):
    root, k = tiny
    mac = "02:aa:bb:cc:dd:01"
    k.call("nl_set_vf", pf=PF_DEV, vf=0, change={"mac": mac})
    vf0 = k.call("state")["pfs"][PF]["vfs"]["0"]
    assert vf0["mac"] == mac and vf0["netdev_mac"] != mac
    k.call("sysfs_write", path="sys/bus/pci/devices/0000:08:00.2/driver/unbind",
           value="0000:08:00.2")
    assert k.call("state")["pfs"][PF]["vfs"]["0"]["netdev"] is None  # unbind removes the netdev
    k.call("sysfs_write", path="sys/bus/pci/drivers/mlx5_core/bind", value="0000:08:00.2")
    k.call("wait_settled", timeout=30)
    vf0 = k.call("state")["pfs"][PF]["vfs"]["0"]
    assert vf0["netdev_mac"] == mac
    assert (root / "sys/class/net/enp8s0f0v0/address").read_text().strip() == mac


def test_bind_of_a_bound_vf_is_ebusy_and_unknown_device_enodev(tiny):
    _root, k = tiny
    with pytest.raises(SimKernelError) as e:
        k.call("sysfs_write", path="sys/bus/pci/drivers/mlx5_core/bind", value="0000:08:00.2")
    assert e.value.errno == errno.EBUSY
    with pytest.raises(SimKernelError) as e:
        k.call("sysfs_write", path="sys/bus/pci/drivers/mlx5_core/bind", value="0000:99:00.0")
    assert e.value.errno == errno.ENODEV


def test_vf_link_settings_on_the_netdev_and_vf_settings_on_the_pf(tiny):
    root, k = tiny
    k.call("nl_set_link", name="enp8s0f0v0", change={"mtu": 4000, "up": False})
    assert (root / "sys/class/net/enp8s0f0v0/mtu").read_text().strip() == "4000"
    assert (root / "sys/class/net/enp8s0f0v0/operstate").read_text().strip() == "down"
    with pytest.raises(SimKernelError) as e:
        k.call("nl_set_link", name="enp8s0f0v0", change={"mtu": 20000})
    assert e.value.errno == errno.EINVAL
    with pytest.raises(SimKernelError) as e:
        k.call("nl_set_link", name="eth7", change={"up": True})
    assert e.value.errno == errno.ENODEV
    k.call("nl_set_vf", pf=PF_DEV, vf=3,
           change={"vlan": 7, "trust": False, "link_state": "disable"})
    vf3 = next(v for v in k.call("nl_vfs", pf=PF_DEV) if v["index"] == 3)
    assert (vf3["vlan"], vf3["trust"], vf3["link_state"]) == (7, False, "disable")
    with pytest.raises(SimKernelError) as e:
        k.call("nl_set_vf", pf=PF_DEV, vf=3, change={"node_guid": "00:11:22:33:44:55:66:77"})
    assert e.value.errno == errno.EOPNOTSUPP


# ---- modules, blacklist and openibd ---------------------------------------------------------


def test_unloading_a_module_with_holders_fails_in_use(tiny):
    root, k = tiny
    r = tool(root, "rmmod", "ib_core")
    assert r.returncode == 1 and "in use" in r.stderr
    r = tool(root, "modprobe", "-r", "mlx5_core")
    assert r.returncode == 1 and "in use" in r.stderr
    assert (root / "sys/module/mlx5_core").is_dir()
    assert "mlx5_ib" in os.listdir(root / "sys/module/mlx5_core/holders")
    assert (root / "sys/module/ib_core/refcnt").read_text().strip() == str(
        len(os.listdir(root / "sys/module/ib_core/holders")))


def test_modinfo_reports_the_installed_driver_and_sysfs_the_loaded_one(tiny):
    root, _k = tiny
    sc = load_scenario(SCENARIOS / "tiny-eth.toml")
    r = tool(root, "modinfo", "-F", "srcversion", "mlx5_core")
    assert r.returncode == 0 and r.stdout.strip() == sc.installed_srcversion("mlx5_core")
    assert (root / "sys/module/mlx5_core/srcversion").read_text().strip() == sc.host_srcversion(
        "mlx5_core")
    assert tool(root, "modinfo", "-F", "version", "mlx5_ib").stdout.strip() == "25.07-0.9.7"
    assert tool(root, "modinfo", "no_such_mod").returncode == 1
    proc = (root / "proc/modules").read_text()
    assert any(line.startswith("mlx5_core ") and "mlx5_ib," in line for line in proc.splitlines())


def test_openibd_restart_takes_scaled_time_and_loads_the_installed_stack(tiny):
    root, k = tiny
    sc = load_scenario(SCENARIOS / "tiny-eth.toml")
    blacklist(root)
    start = time.monotonic()
    r = tool(root, "openibd", "restart")
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert took >= sc.scaled(sc.openibd_restart_s)  # 20 s x 0.01: at least 0.2 s
    events = timeline(root)
    unloaded = next(e for e in events if e["event"] == "openibd.unloaded")
    loaded = next(e for e in events if e["event"] == "openibd.loaded")
    assert loaded["t"] - unloaded["t"] >= sc.scaled(sc.openibd_restart_s) - 1e-3
    for m in ("mlx5_core", "mlx5_ib", "ib_core"):
        loaded = (root / f"sys/module/{m}/srcversion").read_text().strip()
        assert loaded == sc.installed_srcversion(m)
    k.call("wait_settled", timeout=30)
    st = k.call("state")
    pf = st["pfs"][PF]
    # VFs do not come back by themselves; the PF netdev does (renamed by udev), with defaults.
    assert pf["numvfs"] == 0 and pf["vfs"] == {}
    assert pf["name"] == PF_DEV and pf["mtu"] == 1500
    assert numvfs_attr(root).read_text().strip() == "0"


def test_without_blacklist_the_host_reloads_its_own_driver_and_openibd_fails(tiny):
    root, k = tiny
    sc = load_scenario(SCENARIOS / "tiny-eth.toml")
    r = tool(root, "openibd", "restart")
    assert r.returncode == 1 and "in use" in r.stderr
    assert k.call("state")["modules"]["mlx5_core"]["srcversion"] == sc.host_srcversion("mlx5_core")
    assert any(e["event"] == "udev.alias_autoload" for e in timeline(root))


def test_modprobe_by_alias_honours_the_blacklist_but_by_name_does_not(tiny):
    root, k = tiny
    reload_driver(root, k)  # the installed stack is loaded, the blacklist file stays
    assert tool(root, "modprobe", "-r", "mlx5_ib").returncode == 0
    assert "mlx5_core" not in k.call("state")["modules"]  # -r takes now-unused dependencies too
    assert tool(root, "modprobe", "pci:v000015B3d0000101Dsv*sd*bc02sc00i00").returncode == 0
    assert "mlx5_core" not in k.call("state")["modules"]  # blacklisted: the alias load is skipped
    r = tool(root, "modprobe", "mlx5_core")
    assert r.returncode == 0, r.stderr
    assert "mlx5_core" in k.call("state")["modules"]


def test_modprobe_against_a_stack_of_another_version_is_einval(tiny):
    root, k = tiny
    assert tool(root, "modprobe", "-r", "mlx5_ib").returncode == 0
    r = tool(root, "modprobe", "mlx5_core")  # installed 25.07 against the loaded 24.04 mlx_compat
    assert r.returncode == 1 and "Invalid argument" in r.stderr
    assert "mlx5_core" not in k.call("state")["modules"]


def test_modules_outside_the_stack_make_openibd_fail_in_use_and_change_nothing(make_node):
    root, k = make_node(SCENARIOS / "tiny-ib-holders.toml")
    blacklist(root)
    before = k.call("state")
    first = tool(root, "openibd", "restart")  # openibd_failures = 1: the first restart fails
    assert first.returncode == 1 and "in use" in first.stderr
    r = tool(root, "openibd", "restart")
    assert r.returncode == 1 and "in use by" in r.stderr
    assert k.call("state") == before
    # Unload what holds the stack (aux module, storage ULP, peermem once its user is gone): works.
    assert tool(root, "modprobe", "-r", "mlx5_fwctl").returncode == 0
    assert tool(root, "modprobe", "-r", "nvme_rdma").returncode == 0
    assert tool(root, "rmmod", "nvidia_peermem").returncode == 1  # one user holds it
    assert before["modules"]["nvidia_peermem"]["refcnt"] == 1


def test_ib_vf_guids_and_all_zero_guids(make_node):
    _root, k = make_node(SCENARIOS / "tiny-ib-holders.toml")
    st = k.call("state")
    vf0, vf1 = st["pfs"]["0000:18:00.0"]["vfs"]["0"], st["pfs"]["0000:18:00.0"]["vfs"]["1"]
    assert vf0["node_guid"] == "00:11:22:33:44:55:18:00"
    assert vf0["netdev_port_guid"] == "00:11:22:33:44:55:18:01"
    assert vf1["node_guid"] == "00:00:00:00:00:00:00:00"  # never assigned
    with pytest.raises(SimKernelError) as e:
        k.call("nl_set_vf", pf="ibp24s0", vf=0, change={"mac": "02:00:00:00:00:01"})
    assert e.value.errno == errno.EOPNOTSUPP
    assert st["pfs"]["0000:18:00.0"]["link"] == "ib"


# ---- time, restart and determinism ----------------------------------------------------------


def test_events_pending_when_the_kernel_process_stops_complete_after_restart(make_node):
    # udev's renames pending (the probes end inside the numvfs write: synchronous probes)
    root, k = make_node((SCENARIOS / "tiny-eth.toml").read_text().replace(
        "rename_delay_s = [0.1, 0.5]", "rename_delay_s = 50.0"), "pending")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="4")
    pid = k.call("ping")["pid"]
    assert k.call("state")["pending_events"] > 0
    k.close()
    os.kill(pid, signal.SIGTERM)  # the node's kernel process stops with netdevs still pending
    psutil.Process(pid).wait(timeout=30)
    k2 = KernelClient(root)  # a restart catches up as if time had passed
    assert k2.call("ping")["pid"] != pid
    k2.call("wait_settled", timeout=30)
    vfs = k2.call("state")["pfs"][PF]["vfs"]
    assert [v["netdev"] for v in vfs.values()] == ["enp8s0f0v0", "enp8s0f0v1", "enp8s0f0v2",
                                                  "enp8s0f0v3"]
    k2.close()


def test_same_scenario_and_seed_give_the_same_node_and_timeline(make_node):
    roots = [make_node(SCENARIOS / "tiny-eth.toml", name=f"n{i}") for i in range(2)]
    orders = []
    for root, k in roots:
        k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
        k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="4")
        k.call("wait_settled", timeout=30)
        orders.append([(e["event"], e.get("name"), e.get("pci")) for e in timeline(root)])
    assert orders[0] == orders[1]
    states = [k.call("state") for _, k in roots]
    assert states[0] == states[1]


def test_stop_leaves_a_consistent_node_that_a_new_kernel_process_serves(tiny):
    root, k = tiny
    before = k.call("state")
    k.close()
    assert stop_kernel(root)
    k2 = KernelClient(root)
    assert k2.call("state") == before
    k2.close()


def test_stop_returns_once_the_kernel_process_has_exited_so_the_node_can_be_deleted(tiny):
    """`sim run` deletes its temporary node right after stop_kernel: a kernel still saving its
    state then would put `.sim/kernel.json` back into the half-deleted tree."""
    root, k = tiny
    proc = kernel_process(k)
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")  # dirty
    k.close()
    assert stop_kernel(root)
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    shutil.rmtree(root)
    assert not root.exists()


def test_stop_never_signals_a_process_that_is_not_the_nodes_kernel(tiny):
    """A lock left by a kernel long gone names a PID another process may have by now."""
    root, k = tiny
    k.close()
    assert stop_kernel(root)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (root / ".sim/kernel.lock").write_text(f"{bystander.pid}\n")
        assert stop_kernel(root) is False
        assert bystander.poll() is None  # still running: not signalled
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_a_refused_field_stops_the_vf_info_and_keeps_what_came_before(tiny):
    """The contract's "Partial apply": MAC, VLAN, rate, spoofchk, link state, trust, GUIDs in that
    order; a refused one stops the rest, the fields before it stay applied."""
    _root, k = tiny
    with pytest.raises(SimKernelError) as e:
        k.call("nl_set_vf", pf=PF_DEV, vf=3, change={
            "trust": False, "vlan": 900, "link_state": "sideways", "spoofchk": False})
    assert e.value.errno == errno.EINVAL
    vf3 = k.call("state")["pfs"][PF]["vfs"]["3"]
    assert (vf3["vlan"], vf3["spoofchk"]) == (900, False)  # before link_state: applied
    assert vf3["trust"] is True and vf3["link_state"] == "auto"  # at and after it: not
    # a list of VF-infos stops at the first refused VF; the earlier VFs keep their settings
    with pytest.raises(SimKernelError):
        k.call("nl_set_vfs", pf=PF_DEV, infos=[[0, {"vlan": 10}], [1, {"qos": 9}],
                                               [3, {"vlan": 30}]])
    vfs = k.call("state")["pfs"][PF]["vfs"]
    assert (vfs["0"]["vlan"], vfs["1"]["qos"], vfs["3"]["vlan"]) == (10, 3, 900)


# ---- the kernel process itself: it never outlives its node ---------------------------------------


def kernel_process(k: KernelClient) -> psutil.Process:
    return psutil.Process(k.call("ping")["pid"])


def test_sigterm_stops_the_kernel_process_promptly_with_a_subscriber_connected(tiny):
    root, k = tiny
    proc = kernel_process(k)
    listener = KernelClient(root)
    listener.subscribe()  # a daemon waiting for udev events keeps this connection open
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        listener.close()
    assert not (root / ".sim/kernel.sock").exists()


def test_the_kernel_process_exits_when_its_directory_is_deleted(make_node):
    root, k = make_node(SCENARIOS / "tiny-eth.toml", "doomed")
    proc = kernel_process(k)
    k.close()
    import shutil

    shutil.rmtree(root)
    proc.wait(timeout=10)  # checked every second, whatever is connected or pending
    assert not proc.is_running()


def test_the_kernel_process_exits_when_idle_even_with_events_due_much_later(make_node,
                                                                              monkeypatch):
    monkeypatch.setenv("MOFED_SIM_IDLE_EXIT_S", "1")  # inherited by the kernel process it starts
    # udev's renames due much later (a late probe would hold the numvfs write itself instead)
    root, k = make_node((SCENARIOS / "tiny-eth.toml").read_text().replace(
        "rename_delay_s = [0.1, 0.5]", "rename_delay_s = 100000.0"), "idle")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="4")
    assert k.call("state")["pending_events"] > 0
    proc = kernel_process(k)
    k.close()
    proc.wait(timeout=15)
    k2 = KernelClient(root)  # a new process catches up; the renames are still owed
    try:
        assert k2.call("state")["pending_events"] > 0
    finally:
        k2.close()


def test_a_kernel_process_whose_node_was_rebuilt_at_the_same_path_exits_and_leaves_it(make_node):
    import shutil

    from mofed_lifecycle.sim.node import init_node

    scenario = SCENARIOS / "tiny-eth.toml"
    root, k = make_node(scenario, "rebuilt")
    old = kernel_process(k)
    k.close()
    shutil.rmtree(root)
    init_node(scenario, root)  # same path at once (maybe the same inode): a different node
    old.wait(timeout=10)
    k2 = KernelClient(root)
    try:
        assert k2.call("ping")["pid"] != old.pid
        assert k2.call("state")["pfs"][PF]["numvfs"] == 4
    finally:
        k2.close()


def test_a_node_deeper_than_a_unix_socket_path_allows_still_gets_its_kernel(tmp_path):
    """sun_path holds 108 bytes; pytest-xdist's or a TMPDIR's roots go deeper. The node works."""
    root = tmp_path / ("d" * 60) / ("e" * 60) / "node"
    assert len(str(root / ".sim/kernel.sock")) > 108
    init_node(SCENARIOS / "tiny-eth.toml", root)
    try:
        with KernelClient(root) as k:
            assert PF in k.call("state")["pfs"]
        assert tool(root, "modprobe", "-r", "mlx5_ib").returncode == 0  # a tool connects too
    finally:
        stop_kernel(root)


def test_a_kernel_that_cannot_start_says_why_at_once(tmp_path):
    root = tmp_path / "node"
    init_node(SCENARIOS / "tiny-eth.toml", root)
    (root / ".sim/kernel.json").write_text("{not json")
    # the process's exit and its log, not "did not start within 60s" a minute later
    with pytest.raises(RuntimeError, match="exited 1 at start: .*JSONDecodeError"):
        KernelClient(root)


def test_a_kernel_served_from_a_thread_is_the_same_node_and_never_signals_its_host(tmp_path):
    """The suite's nodes run their kernel in a thread of pytest (sim.kernel_thread): clients see
    the same node, `sim stop` finds no PID to signal, and what it changed outlives it."""
    root = tmp_path / "node"
    init_node(SCENARIOS / "tiny-eth.toml", root)
    kernel = ThreadKernel(root)
    try:
        with KernelClient(root) as k:
            assert k.call("ping")["pid"] == os.getpid()
            k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
        assert not stop_kernel(root)  # no PID in the lock: this process is never signalled
        r = tool(root, "modprobe", "-r", "mlx5_ib")  # a subprocess reaches the same kernel
        assert r.returncode == 0, r.stderr
    finally:
        kernel.stop()
    with KernelClient(root) as k:  # a kernel process now serves what the thread left
        state = k.call("state")
        assert k.call("ping")["pid"] != os.getpid()
    stop_kernel(root)
    assert "mlx5_ib" not in state["modules"]
    assert state["pfs"][PF]["vfs"] == {}
