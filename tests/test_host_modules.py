"""The module adapter against simulated nodes: what it reads, what it runs, and what follows.

The tools are the simulated node's stand-ins (PATH points at `<root>/.sim/bin`), run as real
subprocesses; the checks are what an operator would see: the decision, the refusal, and the node's
modules after the unload / openibd / reload sequence the plan describes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mofed_lifecycle.config import load_config
from mofed_lifecycle.host.commands import Commands
from mofed_lifecycle.host.modules import (
    ModuleCommandError,
    installed_srcversions,
    loaded_srcversions,
    modprobe,
    modprobe_remove,
    parse_proc_modules,
    read_module_facts,
)
from mofed_lifecycle.host.paths import NodePaths
from mofed_lifecycle.lifecycle.decide import compared_modules, decide
from mofed_lifecycle.lifecycle.preflight import STACK, ModuleFacts, plan
from mofed_lifecycle.sim.scenario_parse import load_scenario, parse_scenario

from .conftest import SCENARIOS

T = 20.0  # command timeout, seconds
CFG = load_config({}, require_driver_version=False)
STORAGE_OK = load_config({"UNLOAD_STORAGE_MODULES": "true"}, require_driver_version=False)

# tiny-ib-holders without peermem's user, openibd's scripted failure, plus a second storage
# holder chain (xprtrdma holds rpcrdma holds ib_core), as on older kernels.
HOLDERS_FREE = (SCENARIOS / "tiny-ib-holders.toml").read_text().replace(
    "openibd_failures = 1", "openibd_failures = 0").replace(
    "peermem_users = 1", "peermem_users = 0").replace(
    'extra_modules = [ { name = "nvme_rdma", holds = ["ib_core", "rdma_cm"] } ]',
    'extra_modules = [ { name = "nvme_rdma", holds = ["ib_core", "rdma_cm"] },\n'
    '  { name = "rpcrdma", holds = ["ib_core", "rdma_cm"] },\n'
    '  { name = "xprtrdma", holds = ["rpcrdma"] } ]')


def env_for(root: Path) -> Commands:
    """The node's stand-in tools, run as real subprocesses (what the host adapter does)."""
    return Commands({**os.environ, "PATH": f"{root}/.sim/bin:" + os.environ["PATH"]})


def openibd_restart(root: Path) -> subprocess.CompletedProcess:
    blacklist = root / "etc/modprobe.d/blacklist-ofed-modules.conf"
    blacklist.write_text("".join(f"blacklist {m}\n" for m in CFG.blacklist_modules))
    try:
        return subprocess.run([str(root / "etc/init.d/openibd"), "restart"], capture_output=True,
                              text=True, timeout=60)
    finally:
        blacklist.unlink()


def reading(root: Path, modules: tuple[str, ...]):
    paths = NodePaths.at(root)
    return decide(loaded_srcversions(paths, modules),
                  installed_srcversions(modules, env_for(root), T), modules,
                  present=set(read_module_facts(paths)))


# ---- reading the node --------------------------------------------------------------------------


def test_proc_modules_lines_as_the_kernel_writes_them():
    facts = parse_proc_modules(
        "ib_core 462848 3 rdma_cm,ib_uverbs,mlx5_ib, Live 0xffffffffc0a00000\n"
        "nvme_rdma 53248 2 - Live 0xffffffffc0b00000 (OE)\n"
        "dummy_mod 16384 0 [permanent], Live 0xffffffffc0c00000\n"
        "mlx5-fwctl 16384 0 - Loading 0xffffffffc0d00000\n\n")
    assert facts["ib_core"] == ModuleFacts("ib_core", 3, ("rdma_cm", "ib_uverbs", "mlx5_ib"))
    assert facts["nvme_rdma"].users == 2  # refcnt 2, no module holder: e.g. two controllers
    assert facts["dummy_mod"].permanent and facts["dummy_mod"].holders == ()
    assert "mlx5_fwctl" in facts


def test_holders_are_the_union_of_proc_modules_and_sysfs_and_sysfs_may_be_missing(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text(
        "ib_core 1 2 rdma_cm, Live 0x0\nrdma_cm 1 0 - Live 0x0\nghost 1 0 - Live 0x0\n")
    for holder in ("rdma_cm", "nvme_rdma"):
        (tmp_path / "sys/module/ib_core/holders" / holder).mkdir(parents=True)
    (tmp_path / "sys/module/rdma_cm").mkdir(parents=True)  # no holders/ directory
    facts = read_module_facts(NodePaths.at(tmp_path))  # no /sys/module/ghost at all
    assert facts["ib_core"].holders == ("rdma_cm", "nvme_rdma")
    assert facts["rdma_cm"].holders == () and facts["ghost"].holders == ()


def test_holder_graph_of_the_ib_node(make_node):
    root, _k = make_node(SCENARIOS / "tiny-ib-holders.toml")
    facts = read_module_facts(NodePaths.at(root))
    assert {"nvme_rdma", "nvidia_peermem", "mlx5_ib"} <= set(facts["ib_core"].holders)
    assert "nvme_rdma" in facts["rdma_cm"].holders
    assert "mlx5_fwctl" in facts["mlx5_core"].holders
    assert facts["nvidia_peermem"].refcnt == 1 and facts["nvidia_peermem"].users == 1


def test_tiny_eth_needs_a_reload_from_24_04_to_25_07_and_says_so(tiny):
    root, _k = tiny
    sc = load_scenario(SCENARIOS / "tiny-eth.toml")
    d = reading(root, compared_modules(CFG))
    # every loaded module of the old stack differs, not only the core
    assert d.reload
    assert {"mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs", "rdma_ucm"} <= {
        c.module for c in d.differences}
    core = d.comparisons[0]
    assert (core.loaded, core.installed) == (sc.host_srcversion("mlx5_core"),
                                             sc.installed_srcversion("mlx5_core"))
    assert (f"mlx5_core srcversion {sc.host_srcversion('mlx5_core')} loaded ≠ "
            f"{sc.installed_srcversion('mlx5_core')} installed") in d.explain()
    # After openibd loads the installed stack, the same readings say nothing is to be done.
    assert openibd_restart(root).returncode == 0
    after = reading(root, compared_modules(CFG))
    assert not after.reload and after.explain().startswith("no reload: mlx5_core, mlx5_ib")


def test_srcversions_of_modules_nobody_has_are_none(tiny):
    root, _k = tiny
    assert loaded_srcversions(NodePaths.at(root), ["nvme_rdma"]) == {"nvme_rdma": None}
    assert installed_srcversions(["no_such_mod"], env_for(root), T) == {"no_such_mod": None}
    d = reading(root, compared_modules(load_config({"ENABLE_NFSRDMA": "true"},
                                                   require_driver_version=False)))
    nvme = next(c for c in d.comparisons if c.module == "nvme_rdma")
    assert (nvme.present, nvme.installed, nvme.differs) == (False, None, False)
    assert "nvme_rdma" in d.absent and "nvme_rdma" not in d.explain()  # absent: no difference


# ---- the plan against the node -------------------------------------------------------------------


def test_ib_node_is_refused_for_its_storage_holder_then_for_peermem_in_use(make_node):
    root, _k = make_node(SCENARIOS / "tiny-ib-holders.toml")
    facts = read_module_facts(NodePaths.at(root))
    refused = plan(facts, CFG).refused or ""
    assert refused.startswith("nvme_rdma (storage) holds ib_core, rdma_cm; "
                              "set UNLOAD_STORAGE_MODULES=true")
    refused = plan(facts, STORAGE_OK).refused or ""
    assert refused.startswith("nvidia_peermem holds ib_core, ib_uverbs and is in use (refcnt 1)")


def test_plan_order_lets_rmmod_take_each_module_in_turn(make_node):
    root, _k = make_node(HOLDERS_FREE)
    p = plan(read_module_facts(NodePaths.at(root)), STORAGE_OK)
    assert p.ok, p.refused
    assert p.unload.index("xprtrdma") < p.unload.index("rpcrdma")
    for m in p.unload:  # rmmod: no dependency is taken along, so the order alone must hold
        r = subprocess.run([str(root / ".sim/bin/rmmod"), m], capture_output=True, text=True,
                           timeout=T)
        assert r.returncode == 0, (m, r.stderr)
    left = read_module_facts(NodePaths.at(root))
    assert not set(p.unload) & set(left)
    assert all(set(left[m].holders) <= set(STACK) for m in left if m in STACK)


def test_unload_reload_and_load_again_brings_the_installed_driver_and_its_holders(make_node):
    root, _k = make_node(HOLDERS_FREE)
    sc = parse_scenario(HOLDERS_FREE)
    env, paths = env_for(root), NodePaths.at(root)
    p = plan(read_module_facts(paths), STORAGE_OK)
    assert p.unload == ("mlx5_fwctl", "nvidia_peermem", "nvme_rdma", "xprtrdma", "rpcrdma")
    modprobe_remove(p.unload, env, T)  # `-r xprtrdma` takes rpcrdma along: that is fine
    assert openibd_restart(root).returncode == 0
    modprobe(p.reload_after, env, T)
    facts = read_module_facts(paths)
    assert set(p.reload_after) <= set(facts) and "nvidia_peermem" not in facts
    assert "nvme_rdma" in facts["ib_core"].holders
    again = loaded_srcversions(paths, p.reload_after)
    assert again == {m: sc.installed_srcversion(m) for m in p.reload_after}
    assert not reading(root, compared_modules(CFG)).reload


def test_modprobe_remove_stops_at_the_first_module_in_use_and_says_what_to_do(make_node):
    root, _k = make_node(SCENARIOS / "tiny-ib-holders.toml")
    with pytest.raises(ModuleCommandError) as e:
        modprobe_remove(["nvidia_peermem", "mlx5_fwctl"], env_for(root), T)
    msg = str(e.value)
    # rmmod, not `modprobe -r`: that would also take nvidia (the GPU driver) as unused
    assert msg.startswith("rmmod nvidia_peermem failed (exit 1): rmmod: ERROR: ")
    assert "in use" in msg and "stop that user, then retry" in msg
    assert e.value.returncode == 1 and isinstance(e.value, OSError)
    assert "mlx5_fwctl" in read_module_facts(NodePaths.at(root))  # the rest is left alone


def test_modprobe_failure_carries_the_kernel_refusal(tiny):
    root, _k = tiny
    env = env_for(root)
    modprobe_remove(["mlx5_ib"], env, T)  # takes the 24.04 mlx5_core along; mlx_compat stays
    with pytest.raises(ModuleCommandError) as e:  # 25.07 mlx5_core against 24.04 mlx_compat
        modprobe(["mlx5_core"], env, T)
    assert "Invalid argument" in str(e.value) and "dmesg" in str(e.value)


def test_missing_tools_are_a_clear_error_not_a_silent_none(tmp_path):
    env = Commands({**os.environ, "PATH": str(tmp_path)})  # no modinfo, no modprobe
    with pytest.raises(ModuleCommandError, match="could not be started.*on PATH"):
        installed_srcversions(["mlx5_core"], env, T)
    with pytest.raises(ModuleCommandError, match="modprobe"):
        modprobe(["mlx5_core"], env, T)
