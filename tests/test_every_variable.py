"""Every variable of the configuration table either works or is refused (issue 14): each has a
test here or elsewhere that shows its effect on the node, or its refusal. `EXERCISED` names it;
the first test checks the table and this registry agree, and that each named test exists."""

from __future__ import annotations

import ast
import json
import signal
from pathlib import Path

import pytest

from mofed_lifecycle.config import SPECS, ConfigError, load_config
from mofed_lifecycle.host.udev_rules import HEADER, RULE

from .test_lifecycle import MARKER, events, jsonl, lifecycle, wait_for

TESTS = Path(__file__).resolve().parent
ME = "test_every_variable.py"

# variable -> the tests (file::function) that show its effect or its refusal
EXERCISED: dict[str, list[str]] = {
    "NVIDIA_NIC_DRIVER_VER": ["test_config.py::test_cli_exits_2_with_one_line_and_no_traceback",
                              f"{ME}::test_the_driver_and_container_versions_are_in_the_marker_and_log"],
    "NVIDIA_NIC_DRIVER_PATH": ["test_provision_sim.py::test_sources_mode_without_its_source_tree_is_refused_at_start",
                               "test_provision_sim.py::test_missing_headers_are_named_before_any_build"],
    "NVIDIA_NIC_CONTAINER_VER": [f"{ME}::test_the_driver_and_container_versions_are_in_the_marker_and_log"],
    "NVIDIA_NIC_DRIVERS_INVENTORY_PATH": [
        "test_provision_sim.py::test_a_cold_cache_builds_once_then_a_restart_installs_from_the_cache_without_building",
        "test_provision_sim.py::test_a_mismatched_or_corrupt_cache_entry_is_rebuilt"],
    "ENABLE_NFSRDMA": ["test_no_harm.py::test_nfsrdma_with_absent_ulps_never_reloads_a_matching_node_over_five_starts"],
    "UNLOAD_STORAGE_MODULES": ["test_lifecycle.py::test_storage_module_refuses_the_reload_untouched_unless_allowed"],
    "STORAGE_MODULES": ["test_decide_preflight.py::test_classify_by_the_configured_lists_with_the_stack_first"],
    "UNLOAD_THIRD_PARTY_RDMA_MODULES": ["test_decide_preflight.py::test_third_party_provider_needs_its_own_switch"],
    "THIRD_PARTY_RDMA_MODULES": ["test_decide_preflight.py::test_classify_by_the_configured_lists_with_the_stack_first"],
    "MLX5_AUXILIARY_MODULES": ["test_decide_preflight.py::test_auxiliary_modules_handling_disabled_makes_a_loaded_one_unknown"],
    "OFED_BLACKLIST_MODULES": ["test_config.py::test_lists_and_empty_values"],
    "OFED_BLACKLIST_MODULES_FILE": ["test_hardening.py::test_a_users_file_at_the_blacklist_path_survives_a_restart_and_a_reload"],
    "BLACKLIST_SETTLE_SEC": ["test_sim_v2_rules.py::test_a_blacklist_younger_than_udevs_lag_does_not_stop_the_hosts_alias_load"],
    "CREATE_IFNAMES_UDEV": [f"{ME}::test_create_ifnames_udev_writes_the_short_name_rule_and_removes_it_on_stop",
                            f"{ME}::test_the_rule_is_not_written_where_names_already_carry_the_port_suffix"],
    "RESTORE_DRIVER_ON_POD_TERMINATION": ["test_lifecycle.py::test_sigterm_with_restore_on_termination_puts_the_inbox_driver_back"],
    "BIND_DELAY_SEC": [f"{ME}::test_bind_delay_sec_is_accepted_said_to_have_no_effect_and_sleeps_nowhere"],
    "USE_DKMS": [f"{ME}::test_use_dkms_true_is_refused_with_what_to_do_instead"],
    "DTK_OCP_DRIVER_BUILD": ["test_provision_sim.py::test_no_sidecar_at_all_is_an_error_at_the_dtk_deadline",
                             "test_provision_sim.py::test_dtk_mode_end_to_end_builds_in_the_sidecar_and_notices_the_done_flag"],
    "DTK_OCP_NIC_SHARED_DIR": ["test_provision_sim.py::test_no_sidecar_at_all_is_an_error_at_the_dtk_deadline"],
    "DTK_BUILD_TIMEOUT_SEC": ["test_provision_sim.py::test_no_sidecar_at_all_is_an_error_at_the_dtk_deadline"],
    "APPEND_DRIVER_BUILD_FLAGS": ["test_provision_sim.py::test_a_mismatched_or_corrupt_cache_entry_is_rebuilt",
                                  f"{ME}::test_unbalanced_build_flags_are_refused_at_start"],
    "BUILD_TIMEOUT_SEC": ["test_provision_sim.py::test_a_build_past_its_deadline_is_killed_and_reported_with_its_tail"],
    "BUILD_PROGRESS_SEC": ["test_provision_sim.py::test_a_build_past_its_deadline_is_killed_and_reported_with_its_tail"],
    "ENTRYPOINT_DEBUG": ["test_lifecycle.py::test_entrypoint_debug_keeps_a_trace_and_sleeps_before_exiting_on_failure"],
    "DEBUG_LOG_FILE": ["test_lifecycle.py::test_entrypoint_debug_keeps_a_trace_and_sleeps_before_exiting_on_failure"],
    "DEBUG_SLEEP_SEC_ON_EXIT": ["test_lifecycle.py::test_entrypoint_debug_keeps_a_trace_and_sleeps_before_exiting_on_failure"],
    "DRIVER_READY_PATH": ["test_hardening.py::test_a_path_the_daemon_cannot_write_is_refused_naming_the_variable"],
    "LOCK_FILE_PATH": ["test_hardening.py::test_a_path_the_daemon_cannot_write_is_refused_naming_the_variable"],
    "MLX_DRIVERS_MOUNT": [f"{ME}::test_a_stale_headers_mount_is_made_again_at_start_and_unmounted_on_stop"],
    "SHARED_KERNEL_HEADERS_DIR": [f"{ME}::test_a_stale_headers_mount_is_made_again_at_start_and_unmounted_on_stop"],
    "MLX_UDEV_RULES_FILE": [f"{ME}::test_create_ifnames_udev_writes_the_short_name_rule_and_removes_it_on_stop"],
    "OPENIBD_TIMEOUT_SEC": ["test_lifecycle.py::test_openibd_hanging_past_its_timeout_fails_cleanly"],
    "OPENIBD_ATTEMPTS": ["test_lifecycle.py::test_openibd_failing_once_is_retried"],
    "TOOL_TIMEOUT_SEC": ["test_stop_budget.py::test_sigterm_as_the_swap_starts_ends_within_the_printed_budget_despite_hanging_modprobes"],
    "RECHECK_INTERVAL_SEC": ["test_lifecycle.py::test_a_refused_daemon_stays_up_not_ready_and_rechecks"],
    "VF_RESTORE_TIMEOUT_SEC": ["test_sriov_restore.py::test_a_vf_that_never_appears_is_reported_and_a_later_start_restores_it"],
    "VF_RESTORE_WORKERS": [f"{ME}::test_the_restore_pools_are_sized_by_their_variables"],
    "VF_BIND_WORKERS": [f"{ME}::test_the_restore_pools_are_sized_by_their_variables"],
    "UPLINK_POLICY": ["test_uplink.py::test_restore_puts_the_addresses_and_default_route_back_before_the_first_vf",
                      "test_uplink.py::test_refuse_refuses_the_reload_and_touches_nothing",
                      "test_uplink.py::test_ignore_only_warns_and_the_uplink_is_lost_as_on_todays_nodes",
                      "test_uplink.py::test_a_bad_policy_is_refused_at_start"],
    "NODE_IP": ["test_uplink.py::test_the_node_ip_on_a_reloaded_pf_comes_back_where_the_default_route_is_elsewhere",
                "test_uplink.py::test_the_simulated_kernel_lists_the_prefix_routes_and_ipv6_addresses_of_the_uplink"],
    "READY_ON_PARTIAL_RESTORE": ["test_probe_status.py::test_partial_restore_is_ready_only_when_the_daemon_was_told_to_accept_it"],
    "HEARTBEAT_INTERVAL_SEC": ["test_probe_status.py::test_live_passes_while_the_daemon_beats_and_fails_on_a_stale_or_hung_heartbeat",
                               "test_provision_sim.py::test_a_sidecar_killed_mid_build_is_reported_within_its_heartbeat_period"],
    "METRICS_TEXTFILE": ["test_probe_status.py::test_metrics_path_must_be_a_prom_file"],
    "PEERMEM_UNLOAD_WAIT_SEC": ["test_peermem.py::test_a_nic_upgrade_with_a_watching_loader_unloads_then_loads_against_the_new_stack"],
    "GPU_DRIVER_READY_PATH": [f"{ME}::test_peermem_waits_for_the_gpu_driver_where_told_to"],
    "PEERMEM_WAIT_GPU_DRIVER": [f"{ME}::test_peermem_waits_for_the_gpu_driver_where_told_to"],
    "PEERMEM_MODULE_PARAMS": [f"{ME}::test_peermem_module_params_reach_modprobe"],
    "PEERMEM_MODPROBE_TIMEOUT_SEC": ["test_peermem.py::test_a_modprobe_hanging_past_its_timeout_is_killed_and_retried"],
    "PEERMEM_DEBOUNCE_SEC": ["test_peermem.py::test_kernel_upgrade_race_loads_peermem_once_after_the_marker"],
    "PEERMEM_RECHECK_SEC": ["test_peermem.py::test_einval_from_modprobe_is_not_retried_until_something_changes"],
    "UBUNTU_PRO_TOKEN": ["test_config.py::test_the_secret_is_refused_without_being_printed"],
}


def _functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_every_variable_of_the_table_has_a_test_that_shows_its_effect_or_refusal():
    assert sorted(EXERCISED) == sorted(s.var for s in SPECS)
    missing = [t for tests in EXERCISED.values() for t in tests
               if t.split("::")[1] not in _functions(TESTS / t.split("::")[0])]
    assert missing == []


# ---- the ones shown here ------------------------------------------------------------------------


def test_use_dkms_true_is_refused_with_what_to_do_instead():
    with pytest.raises(ConfigError) as e:
        load_config({"NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7", "USE_DKMS": "true"})
    assert str(e.value).startswith("USE_DKMS='true': not implemented by mofed-lifecycle")
    assert "run sources" in str(e.value)
    assert load_config({"NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7", "USE_DKMS": "no"}).use_dkms is False


def test_unbalanced_build_flags_are_refused_at_start():
    with pytest.raises(ConfigError, match="APPEND_DRIVER_BUILD_FLAGS=.*unbalanced quotes"):
        load_config({"NVIDIA_NIC_DRIVER_VER": "1.0", "APPEND_DRIVER_BUILD_FLAGS": "--x='a b"})


def test_bind_delay_sec_is_accepted_said_to_have_no_effect_and_sleeps_nowhere(tiny):
    root, _k = tiny
    r = lifecycle(root, "--once", env={"BIND_DELAY_SEC": "600"})  # 600 s per bind, upstream
    assert r.returncode == 0, r.stderr[-2000:]
    said = next(e for e in events(r.stderr) if e["event"] == "config.no_effect")
    assert said["variable"] == "BIND_DELAY_SEC" and "never a fixed sleep" in said["why"]
    done = next(e for e in events(r.stderr) if e["event"] == "exit")
    assert done["elapsed_s"] < 600  # the run did not wait a bind delay anywhere
    with pytest.raises(ConfigError, match="BIND_DELAY_SEC"):
        load_config({"NVIDIA_NIC_DRIVER_VER": "1.0", "BIND_DELAY_SEC": "soon"})


def test_the_driver_and_container_versions_are_in_the_marker_and_log(tiny):
    root, _k = tiny
    r = lifecycle(root, "--once", env={"NVIDIA_NIC_CONTAINER_VER": "25.07-0.9.7-1-ubuntu22.04"})
    assert r.returncode == 0
    loaded = next(e for e in events(r.stderr) if e["event"] == "config.loaded")
    assert loaded["container_version"] == "25.07-0.9.7-1-ubuntu22.04"
    assert json.loads((root / MARKER).read_text())["driver_version"] == "25.07-0.9.7"


def test_precompiled_mode_says_the_build_variables_have_no_effect(tiny):
    root, _k = tiny
    r = lifecycle(root, "--once", env={"NVIDIA_NIC_DRIVER_PATH": "/root/src",
                                       "DTK_OCP_DRIVER_BUILD": "true"})
    assert r.returncode == 0
    said = next(e for e in events(r.stderr) if e["event"] == "config.not_applicable")
    assert said["variables"] == ["NVIDIA_NIC_DRIVER_PATH", "DTK_OCP_DRIVER_BUILD"]
    assert "run sources" in said["next"]


SHORT_NAMES = (TESTS / "scenarios" / "tiny-eth.toml").read_text()


def _short(text: str) -> str:
    import re

    return re.sub(r'^name = "(enp\w+?)np0"$', r'name = "\1"', text, flags=re.M)


def test_create_ifnames_udev_writes_the_short_name_rule_and_removes_it_on_stop(make_node):
    text = _short(SHORT_NAMES)
    assert 'np0"' not in text.split("[[pf]]", 1)[1].split("\n")[2]
    root, _k = make_node(text)
    rule = root / "etc/udev/rules.d/90-test-names.rules"
    env = {"CREATE_IFNAMES_UDEV": "true", "MLX_UDEV_RULES_FILE": "/etc/udev/rules.d/"
           "90-test-names.rules"}
    proc = lifecycle(root, env=env, wait=False)
    try:
        wait_for(lambda: (root / MARKER).exists(), "ready")
        assert rule.read_text() == RULE  # kept while the daemon runs
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and not rule.exists()
    evs = [e["event"] for e in events(err)]
    assert "udev_rule.written" in evs and "udev_rule.removed" in evs
    foreign = "# the site's own naming rule\n"
    rule.write_text(foreign)
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0 and rule.read_text() == foreign  # never another's file
    assert "udev_rule.not_ours" in [e["event"] for e in events(r.stderr)]


def test_the_rule_is_not_written_where_names_already_carry_the_port_suffix(tiny):
    root, _k = tiny  # enp...np0 names: the vendor scheme already
    rule = root / "host/etc/udev/rules.d/77-mlnx-net-names.rules"
    rule.parent.mkdir(parents=True, exist_ok=True)
    rule.write_text(HEADER + "# a stale one from a killed predecessor\n")
    r = lifecycle(root, "--once", env={"CREATE_IFNAMES_UDEV": "true"})
    assert r.returncode == 0 and not rule.exists()
    skipped = next(e for e in events(r.stderr) if e["event"] == "udev_rule.skipped")
    assert "port-suffixed" in skipped["why"]


def test_a_stale_headers_mount_is_made_again_at_start_and_unmounted_on_stop(tiny):
    root, _k = tiny
    info = root / "proc/self/mountinfo"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text("99 1 0:42 /old /run/mellanox/drivers/usr/src rw - none none rw\n")
    proc = lifecycle(root, wait=False)
    try:
        wait_for(lambda: (root / MARKER).exists(), "ready")
        mounts = [line.split()[4] for line in info.read_text().splitlines()]
        assert mounts == ["/run/mellanox/drivers/usr/src"]  # the stale one gone, ours made
        assert info.read_text().split()[3] == "/usr/src"  # SHARED_KERNEL_HEADERS_DIR
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert info.read_text() == ""
    unmounts = [e["why"] for e in events(err) if e["event"] == "headers.unmounted"]
    assert len(unmounts) == 2 and unmounts[0].startswith("stale") and "stopping" in unmounts[1]


def test_a_custom_headers_dir_and_mount_are_used_as_given(tiny):
    root, _k = tiny
    (root / "opt/headers/ofa_kernel").mkdir(parents=True)
    r = lifecycle(root, "--once", env={"SHARED_KERNEL_HEADERS_DIR": "/opt/headers",
                                       "MLX_DRIVERS_MOUNT": "/run/mellanox/drivers"})
    assert r.returncode == 0
    src, target = (root / ".sim/mounts").read_text().split()
    assert src == str(root / "opt/headers")
    assert target == str(root / "run/mellanox/drivers/opt/headers")


PROBES4 = """
[node]
name = "pools"
time_scale = 0.01
seed = 21
[driver]
loaded_version = "24.10-1.1.4"
installed_version = "25.07-0.9.7"
openibd_restart_s = 5
[udev]
netdev_delay_s = 5
rename = false
probe_parallel = 4
[[pf]]
pci = "0000:08:00.0"
name = "enp8s0f0np0"
numvfs = 8
"""


def _max_overlap(root: Path) -> int:
    probes = [e for e in jsonl(root / ".sim/timeline.jsonl") if e["event"] == "pci.probe"
              and e["pci"] != "0000:08:00.0"]
    edges = sorted([(p["start"], 1) for p in probes] + [(p["end"], -1) for p in probes])
    running = most = 0
    for _t, step in edges:  # ends sort before starts at the same instant: -1 < 1
        running += step
        most = max(most, running)
    return most  # probes in the kernel at once


@pytest.mark.parametrize(("binders", "overlap"), [(1, {1}), (4, {2, 3, 4})])
def test_the_restore_pools_are_sized_by_their_variables(make_node, binders, overlap):
    """VF_BIND_WORKERS: that many bind writes (each lasting its probe) at once, as the kernel's
    four probe lanes show; VF_RESTORE_WORKERS: the pool that finishes the netdevs."""
    root, _k = make_node(PROBES4)
    r = lifecycle(root, "--once", env={"VF_BIND_WORKERS": str(binders),
                                       "VF_RESTORE_WORKERS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    # one writer: never two probes at once; four: several at once, never past the four lanes
    assert _max_overlap(root) in overlap
    started = next(e for e in events(r.stderr) if e["event"] == "restore.started")
    assert (started["workers"], started["bind_workers"]) == (2, binders)
    for var in ("VF_BIND_WORKERS", "VF_RESTORE_WORKERS"):
        with pytest.raises(ConfigError, match=f"{var}='0': expected a whole number"):
            load_config({"NVIDIA_NIC_DRIVER_VER": "1.0", var: "0"})


GPU_NODE = """
[node]
name = "gpu"
time_scale = 0.01
seed = 3
[driver]
loaded_version = "25.07-0.9.7"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
[udev]
netdev_delay_s = 0.2
rename = false
[[pf]]
pci = "0000:3b:00.0"
name = "enp59s0f0np0"
numvfs = 1
[gpu]
peermem_ko = "matching"
"""


def _peermem(root: Path, *args: str, env: dict[str, str]):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json",
                           "peermem", "--root", str(root), *args],
                          env={**os.environ, "PEERMEM_DEBOUNCE_SEC": "0.01",
                               "PEERMEM_RECHECK_SEC": "0.1", **env},
                          capture_output=True, text=True, timeout=60)


def test_peermem_module_params_reach_modprobe(make_node):
    root, k = make_node(GPU_NODE)
    assert lifecycle(root, "--once").returncode == 0
    r = _peermem(root, "--once", "--timeout", "20",
                 env={"PEERMEM_MODULE_PARAMS": "peerdirect_support=1 persistent_api_support=0"})
    assert r.returncode == 0, r.stderr[-2000:]
    modprobe = [e for e in events(r.stderr) if e["event"] == "command.finished"
                and "nvidia-peermem" in e["argv"]]
    assert modprobe and modprobe[-1]["argv"][-2:] == ["peerdirect_support=1",
                                                      "persistent_api_support=0"]
    assert "nvidia_peermem" in k.call("state")["modules"]


def test_peermem_waits_for_the_gpu_driver_where_told_to(make_node):
    root, k = make_node(GPU_NODE)
    assert lifecycle(root, "--once").returncode == 0
    marker = "/run/test/gpu-ready"
    env = {"PEERMEM_WAIT_GPU_DRIVER": "true", "GPU_DRIVER_READY_PATH": marker}
    r = _peermem(root, "--once", "--timeout", "0.3", env=env)
    assert r.returncode == 1 and "the GPU driver's readiness marker and the nvidia module" in \
        r.stderr.splitlines()[-1]
    (root / marker.lstrip("/")).parent.mkdir(parents=True)
    (root / marker.lstrip("/")).write_text("")
    r = _peermem(root, "--once", "--timeout", "0.3", env=env)
    assert r.returncode == 1 and "the nvidia module missing" in r.stderr.splitlines()[-1]
    assert "readiness marker" not in r.stderr.splitlines()[-1]
    r = _peermem(root, "--once", "--timeout", "20", env={})  # not told to: loads
    assert r.returncode == 0 and "nvidia_peermem" in k.call("state")["modules"]


PRELOAD = """
[node]
name = "preload"
time_scale = 0.01
seed = 22
[driver]
loaded_version = "24.10-1.1.4"
installed_version = "25.07-0.9.7"
openibd_restart_s = 5
extra_modules = [ { name = "psample" } ]
[udev]
netdev_delay_s = 0.2
rename = false
[[pf]]
pci = "0000:08:00.0"
name = "enp8s0f0np0"
numvfs = 1
"""


def test_the_installed_drivers_inbox_dependencies_are_preloaded_from_the_host_before_a_reload(
        make_node):
    """psample is the host's (kernel/, not the driver's updates/) and the new mlx5_core needs it:
    it is loaded with `modprobe -d /host` before openibd, as upstream does."""
    from .test_no_harm import sim

    root, k = make_node(PRELOAD)
    kernel = "5.15.0-generic"
    (root / f"lib/modules/{kernel}/updates/psample.ko").unlink()
    core = root / f"lib/modules/{kernel}/updates/mlx5_core.ko"
    core.write_text(core.read_text().replace("depends=", "depends=psample,", 1))
    assert sim("set", "--root", str(root), "module-unload", "psample").returncode == 0
    assert "psample" not in k.call("state")["modules"]
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    pre = next(e for e in events(r.stderr) if e["event"] == "dependency.preloaded")
    assert pre["module"] == "psample" and pre["tree"] == str(root / "host")
    assert k.call("state")["modules"]["psample"]["srcversion"]  # loaded, from the host's tree
    order = [e["event"] for e in events(r.stderr)]
    assert order.index("dependency.preloaded") < order.index("openibd.restart")
