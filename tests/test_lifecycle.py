"""`mofed-lifecycle run` on simulated nodes, as the real command: outcomes an operator would see.

Each test builds a node, runs the lifecycle as a subprocess (the stand-in tools on PATH come from
the node), and checks the node's ground truth, never what the daemon says about itself. Waits poll
the files the daemon and the kernel write (journal, timeline) every 10 ms under a deadline; no test
sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mofed_lifecycle.sim.client import KernelClient
from mofed_lifecycle.sim.scenario import AUX_DEPS, STACK_DEPS
from mofed_lifecycle.sim.scenario_parse import parse_scenario

from .conftest import SCENARIOS, SHARED_SCENARIOS
from .inprocess import run_cli

COMPARED = ("mlx5_core", "mlx5_ib", "ib_core")
MARKER = "run/mellanox/drivers/.driver-ready"
JOURNAL = "run/mellanox/drivers/mofed-lifecycle/journal.json"

STORAGE = """
[node]
name = "storage"
time_scale = 0.01
seed = 9
[driver]
loaded_version = "24.10-1.1.4"
installed_version = "25.07-0.9.7"
openibd_restart_s = 20
extra_modules = [ { name = "nvme_rdma", holds = ["ib_core", "rdma_cm"] } ]
aux_loaded = ["mlx5_fwctl"]
[udev]
netdev_delay_s = 0.3
[[pf]]
pci = "0000:18:00.0"
name = "ibp24s0"
link = "ib"
numvfs = 2
"""


def lifecycle(root: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True,
              timeout: float = 60, process: bool = False
              ) -> subprocess.CompletedProcess | subprocess.Popen:
    """`mofed-lifecycle run --root ROOT ARGS`: in this process (the node's tools as calls) unless
    the test needs the real process (`wait=False` to signal or kill it, or `process=True`). A
    run told to kill itself (MOFED_LIFECYCLE_CRASH_AT) stops dead in-process (`runner.Crashed`)
    and returns -9, as the killed process would."""
    full_env = {**os.environ, "NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7", **(env or {})}
    cli = ["--log-format", "json", "run", "--root", str(root), *args]
    if wait and not process:
        return run_cli(cli, full_env)
    argv = [sys.executable, "-m", "mofed_lifecycle.cli", *cli]
    if not wait:
        return subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout)


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def journal_states(root: Path) -> list[str]:
    doc = json.loads((root / JOURNAL).read_text())
    return [h["state"] for h in doc["history"] if "state" in h]


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    """Poll a condition on files the daemon/kernel write atomically, within a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file another process is appending to."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines() if x]


def kernel_events(root: Path) -> list[str]:
    return [e["event"] for e in jsonl(root / ".sim/timeline.jsonl")]


def assert_installed_driver_ready(root: Path, k: KernelClient, scenario: Path | str) -> None:
    sc = parse_scenario(Path(scenario).read_text() if isinstance(scenario, Path) else scenario)
    st = k.call("state")
    for m in COMPARED:
        assert st["modules"][m]["srcversion"] == sc.installed_srcversion(m), m
    assert st["blacklist_files"] == []
    assert st["markers"][MARKER] is True
    marker = json.loads((root / MARKER).read_text())
    assert marker["driver_version"] == "25.07-0.9.7"
    # the marker records the whole loaded stack, each module the installed build
    stack = [m for m in st["modules"] if m in STACK_DEPS or m in AUX_DEPS]
    assert set(COMPARED) <= set(stack)
    assert marker["srcversions"] == {m: sc.installed_srcversion(m) for m in stack}


# ---- outcomes ---------------------------------------------------------------------------------


def test_reload_brings_the_installed_driver_removes_the_blacklist_and_sets_the_marker(tiny):
    root, k = tiny
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_installed_driver_ready(root, k, SCENARIOS / "tiny-eth.toml")
    assert "openibd.loaded" in kernel_events(root)
    assert journal_states(root)[-3:] == ["mount-headers", "ready", "serve"]
    transitions = [e for e in events(r.stderr) if e["event"] == "state.entered"]
    assert all("elapsed_s" in e for e in transitions) and len(transitions) == 15


def test_matching_driver_is_not_reloaded_and_no_vf_is_touched(make_node):
    root, k = make_node(SHARED_SCENARIOS / "restart-no-reload.toml")
    before = k.call("state")
    r = lifecycle(root, "--once", env={"NVIDIA_NIC_DRIVER_VER": "25.10-1.2.8"})
    assert r.returncode == 0, r.stderr[-2000:]
    after = k.call("state")
    assert after["modules"] == before["modules"] and after["pfs"] == before["pfs"]
    assert "openibd.unloaded" not in kernel_events(root)
    assert "reload" not in journal_states(root) and after["markers"][MARKER]


def test_dry_run_explains_and_changes_nothing(tiny):
    root, k = tiny
    before = k.call("state")
    r = lifecycle(root, "--dry-run")
    assert r.returncode == 0
    assert r.stdout.startswith("decision: reload: mlx5_core srcversion ")
    assert "loaded ≠" in r.stdout and "would run `/etc/init.d/openibd restart`" in r.stdout
    assert k.call("state") == before and not (root / JOURNAL).exists()


def test_dry_run_exits_1_when_the_reload_would_be_refused(make_node):
    root, k = make_node(STORAGE, "storage-dry")
    before = k.call("state")
    r = lifecycle(root, "--dry-run")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "would refuse the reload" in r.stdout and "UNLOAD_STORAGE_MODULES" in r.stdout
    assert k.call("state") == before
    assert lifecycle(root, "--dry-run", env={"UNLOAD_STORAGE_MODULES": "true"}).returncode == 0


def test_storage_module_refuses_the_reload_untouched_unless_allowed(make_node):
    root, k = make_node(STORAGE, "storage")
    before = k.call("state")
    r = lifecycle(root, "--once")
    assert r.returncode == 1
    refused = next(e for e in events(r.stderr) if e["event"] == "reload.refused")
    assert "nvme_rdma" in refused["reason"] and "UNLOAD_STORAGE_MODULES" in refused["reason"]
    after = k.call("state")
    assert after["modules"] == before["modules"] and after["pfs"] == before["pfs"]
    assert after["blacklist_files"] == [] and not after["markers"][MARKER]
    status = json.loads((root / "run/mellanox/drivers/mofed-lifecycle/status.json").read_text())
    assert status["state"] == "refused" and "nvme_rdma" in status["reason"]

    r = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "true"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert_installed_driver_ready(root, k, STORAGE)
    mods = k.call("state")["modules"]
    assert "nvme_rdma" in mods and "mlx5_fwctl" in mods  # loaded again after the swap


def test_a_refused_daemon_stays_up_not_ready_and_rechecks(make_node):
    root, k = make_node(STORAGE, "storage")
    proc = lifecycle(root, env={"RECHECK_INTERVAL_SEC": "0.2"}, wait=False)
    try:
        wait_for(lambda: journal_states(root).count("refused") >= 2 if (root / JOURNAL).exists()
                 else False, "two refusals")
        assert proc.poll() is None  # still up: no crash-loop
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and journal_states(root)[-2:] == ["stopping", "stopped"]


def test_openibd_failing_once_is_retried(make_node):
    root, k = make_node(STORAGE.replace("openibd_restart_s = 20", "openibd_restart_s = 20\n"
                                        "openibd_failures = 1"), "flaky")
    r = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "yes"})
    assert r.returncode == 0, r.stderr[-2000:]
    attempts = [e["attempt"] for e in events(r.stderr) if e["event"] == "openibd.restart"]
    assert attempts == [1, 2]
    assert_installed_driver_ready(root, k, STORAGE)


def test_openibd_hanging_past_its_timeout_fails_cleanly(make_node):
    root, k = make_node(STORAGE.replace("openibd_restart_s = 20", "openibd_restart_s = 3000"),
                        "hang")
    r = lifecycle(root, "--once", env={"UNLOAD_STORAGE_MODULES": "1", "OPENIBD_TIMEOUT_SEC": "0.5",
                                       "OPENIBD_ATTEMPTS": "2"})
    assert r.returncode == 1
    evs = events(r.stderr)
    assert sum(e["event"] == "command.timeout" for e in evs) == 2
    failed = next(e for e in evs if e["event"] == "step.failed")
    assert failed["state"] == "reload" and "failed 2 times" in failed["error"]
    st = k.call("state")
    assert st["blacklist_files"] == [] and not st["markers"][MARKER]
    # the modules unloaded for the swap (openibd's stack too) are loaded back, the blacklist goes,
    # the VFs come back, then the run fails: no marker after a failed reload
    assert journal_states(root)[-5:] == ["reload", "reload-aux", "unblacklist", "restore",
                                         "failed"]
    assert {"nvme_rdma", "mlx5_fwctl", *COMPARED} <= set(st["modules"])  # NVMe-oF is not left down
    pf = st["pfs"]["0000:18:00.0"]
    assert pf["numvfs"] == 2 and all(v["driver"] == "mlx5_core" and v["netdev"]
                                     for v in pf["vfs"].values())
    unwound = next(e for e in evs if e["event"] == "swap.unwound")
    assert unwound["not_reloaded"] == [] and "consistent" in unwound["node"]
    assert unwound["vfs"].startswith("restored")


# ---- one instance, signals ----------------------------------------------------------------------


def test_a_second_instance_exits_1_at_once_naming_the_holder(tiny):
    root, _k = tiny
    first = lifecycle(root, wait=False)
    try:
        wait_for(lambda: (root / MARKER).exists(), "the first instance to be ready")
        second = lifecycle(root, "--once", timeout=30)
        assert second.returncode == 1
        held = next(e for e in events(second.stderr) if e["event"] == "lock.held")
        assert held["holder_pid"] == first.pid and str(first.pid) in held["error"]
        assert (root / MARKER).exists()  # the second one did not clear the first one's marker
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 0 and not (root / MARKER).exists()  # cleared on stop


def test_sigterm_during_the_reload_finishes_the_swap_then_stops(make_node):
    root, k = make_node(STORAGE.replace("openibd_restart_s = 20", "openibd_restart_s = 150"),
                        "term")
    proc = lifecycle(root, env={"UNLOAD_STORAGE_MODULES": "true"}, wait=False)
    try:
        wait_for(lambda: "openibd.unloaded" in kernel_events(root), "openibd to unload the stack")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    states = journal_states(root)
    # the VF restore belongs to the critical section: the stop waits for the VFs to be back
    assert states[-6:] == ["reload", "reload-aux", "unblacklist", "restore", "stopping",
                           "stopped"]
    st = k.call("state")
    pf = st["pfs"]["0000:18:00.0"]
    assert pf["numvfs"] == 2 and all(v["driver"] == "mlx5_core" and v["netdev"]
                                     for v in pf["vfs"].values())
    sc = parse_scenario(STORAGE)
    assert st["modules"]["mlx5_core"]["srcversion"] == sc.installed_srcversion("mlx5_core")
    assert st["blacklist_files"] == [] and not st["markers"][MARKER]


def test_sigterm_with_restore_on_termination_puts_the_inbox_driver_back(tiny):
    root, k = tiny
    sc = parse_scenario((SCENARIOS / "tiny-eth.toml").read_text())
    proc = lifecycle(root, env={"RESTORE_DRIVER_ON_POD_TERMINATION": "true"}, wait=False)
    try:
        wait_for(lambda: (root / MARKER).exists(), "ready")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    st = k.call("state")
    assert st["modules"]["mlx5_core"]["srcversion"] == sc.host_srcversion("mlx5_core")
    assert not st["markers"][MARKER]


# ---- resume after SIGKILL at every state boundary ------------------------------------------------

BOUNDARIES = ["lock", "provision", "inspect", "decide", "snapshot", "preflight", "blacklist",
              "unload-aux", "reload", "reload-aux", "unblacklist", "restore", "mount-headers",
              "ready", "serve"]


@pytest.mark.parametrize("state", BOUNDARIES)
def test_killed_at_any_state_the_next_run_brings_the_node_right(make_node, state):
    root, k = make_node(STORAGE, "kill")
    env = {"UNLOAD_STORAGE_MODULES": "true"}
    r = lifecycle(root, "--once", env={**env, "MOFED_LIFECYCLE_CRASH_AT": state})
    assert r.returncode == -signal.SIGKILL
    assert journal_states(root)[-1] == state
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_installed_driver_ready(root, k, STORAGE)
    if state in ("blacklist", "unload-aux", "reload", "reload-aux", "unblacklist"):
        resumed = next(e for e in events(r.stderr) if e["event"] == "journal.resumed")
        assert resumed["died_mid_swap"] is True


def test_killed_in_the_middle_of_openibd_the_next_run_still_reloads(make_node):
    root, k = make_node(STORAGE.replace("openibd_restart_s = 20", "openibd_restart_s = 300"),
                        "midswap")
    env = {"UNLOAD_STORAGE_MODULES": "true"}
    proc = lifecycle(root, env=env, wait=False)
    try:
        wait_for(lambda: "openibd.unloaded" in kernel_events(root), "the stack to be unloaded")
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    st = k.call("state")
    assert "mlx5_core" not in st["modules"] and st["blacklist_files"]  # left without a driver
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(e["event"] == "blacklist.stale_removed" for e in events(r.stderr))
    assert_installed_driver_ready(root, k, STORAGE)
    assert kernel_events(root).count("openibd.loaded") == 1  # the killed openibd died with us


# ---- `sim run`: the report's outcome measured by the simulator -----------------------------------

SHARED = SHARED_SCENARIOS


def sim_run(path: Path, tmp_path: Path) -> dict:
    report = tmp_path / f"{path.stem}.json"
    r = subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "sim", "run", str(path),
                        "--report", str(report), "--root", str(tmp_path / path.stem)],
                       capture_output=True, text=True, timeout=120)
    from mofed_lifecycle.sim.node import stop_kernel

    stop_kernel(tmp_path / path.stem)
    assert report.exists(), r.stdout + r.stderr
    doc = json.loads(report.read_text())
    assert r.returncode == (0 if doc["outcome"] == "ready" else 1)
    assert "state  decide" in r.stdout and f"outcome: {doc['outcome']}" in r.stdout
    return doc


def test_sim_run_restart_without_reload_is_ready_and_touches_nothing(tmp_path):
    doc = sim_run(SHARED / "restart-no-reload.toml", tmp_path)
    assert doc["outcome"] == "ready" and doc["reloaded"] is False
    before, after = doc["state_before"], doc["state_after"]
    assert after["modules"] == before["modules"] and after["pfs"] == before["pfs"]
    names = [p["name"] for p in doc["phases"]]
    assert names[:4] == ["lock", "provision", "inspect", "decide"] and "reload" not in names
    print(f"restart-no-reload: ready in {doc['duration_s']:.3f}s (acceptance: under 1 s)")


def test_sim_run_upgrade_reloads_to_the_installed_driver(tmp_path):
    path = SHARED / "upgrade-50vf-eth.toml"
    doc = sim_run(path, tmp_path)
    sc = parse_scenario(path.read_text())
    after = doc["state_after"]
    assert doc["outcome"] == "ready" and doc["reloaded"] is True
    assert {m: after["modules"][m]["srcversion"] for m in COMPARED} == {
        m: sc.installed_srcversion(m) for m in COMPARED}
    assert after["blacklist_files"] == [] and after["markers"][MARKER] is True
    names = [p["name"] for p in doc["phases"]]
    assert names.index("blacklist") < names.index("reload") < names.index("unblacklist")
    assert all(p["end_s"] >= p["start_s"] >= 0 for p in doc["phases"])


def test_sim_run_storage_holder_fails_with_the_reason_and_leaves_the_node(tmp_path):
    doc = sim_run(SCENARIOS.parent.parent / "mofed_lifecycle/sim/examples/storage-holder.toml",
                  tmp_path)
    assert doc["outcome"] == "failed" and doc["reloaded"] is False
    assert "nvme_rdma" in doc["reason"] and "UNLOAD_STORAGE_MODULES" in doc["reason"]
    assert doc["state_after"]["modules"] == doc["state_before"]["modules"]
    assert doc["state_after"]["pfs"] == doc["state_before"]["pfs"]


def test_entrypoint_debug_keeps_a_trace_and_sleeps_before_exiting_on_failure(make_node):
    root, _k = make_node(STORAGE, "debug")
    r = lifecycle(root, "--once", env={"ENTRYPOINT_DEBUG": "true", "DEBUG_SLEEP_SEC_ON_EXIT": "0.3",
                                       "DEBUG_LOG_FILE": "/var/log/mofed-debug.log"})
    assert r.returncode == 1
    assert any(e["event"] == "debug.sleep_before_exit" and e["seconds"] == 0.3
               for e in events(r.stderr))
    trace = [json.loads(x) for x in (root / "var/log/mofed-debug.log").read_text().splitlines()]
    assert any(e["event"] == "command.started" for e in trace)  # debug level in the trace
    assert any(e["event"] == "reload.refused" for e in trace)
