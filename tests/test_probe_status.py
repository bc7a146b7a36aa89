"""`probe`, `status` and metrics on simulated nodes: what kubelet and an operator would be told.

The node is the truth: `probe ready` must fail where the operator's `lsmod | grep mlx5_core` passes
(the inbox driver loaded) and pass once `run` has brought the installed driver, set the marker
and restored the VFs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mofed_lifecycle.config import load_config
from mofed_lifecycle.heartbeat import HEARTBEAT_FILE
from mofed_lifecycle.probe import probe_live, probe_ready, probe_startup
from mofed_lifecycle.sim.node import tool_path
from mofed_lifecycle.sim.seam import sim_tools

from .inprocess import run_cli
from .test_lifecycle import MARKER, lifecycle, wait_for

JDIR = "run/mellanox/drivers/mofed-lifecycle"
CONFIG = load_config({}, require_driver_version=False)


def cli(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli([*args, "--root", str(root)], env)


def test_ready_fails_on_the_inbox_driver_where_lsmod_grep_passes(tiny):
    root, _k = tiny
    operator_probe = subprocess.run(["sh", "-c", "lsmod | grep mlx5_core"], capture_output=True,
                                    env={**os.environ, "PATH": tool_path(root)})
    assert operator_probe.returncode == 0  # today's probe: any mlx5_core passes

    r = cli(root, "probe", "ready")
    assert r.returncode == 1 and r.stdout.count("\n") == 1, r.stdout + r.stderr
    assert r.stdout.startswith("ready: FAIL: readiness marker ") and "absent" in r.stdout
    assert r.stderr == ""  # one line on stdout, no log noise for kubelet's events

    # A marker that merely exists (or records the inbox srcversions) does not make it ready.
    loaded = {m: (root / f"sys/module/{m}/srcversion").read_text().strip()
              for m in ("mlx5_core", "mlx5_ib", "ib_core")}
    (root / MARKER).write_text(json.dumps({"driver_version": "x", "srcversions": loaded}))
    result = probe_ready(sim_tools(root), CONFIG)
    assert not result.ok and "mlx5_core srcversion" in result.message
    assert "installed (modinfo)" in result.message
    (root / MARKER).write_text("ready\n")  # the bash entrypoint's kind of marker
    assert "not valid JSON" in probe_ready(sim_tools(root), CONFIG).message

    assert cli(root, "probe", "startup").returncode == 1  # no marker (valid), no heartbeat
    assert cli(root, "probe", "live").returncode == 1


def test_after_run_once_ready_and_startup_pass_and_status_tells_the_story(tiny):
    root, _k = tiny
    r = lifecycle(root, "--once", env={"METRICS_TEXTFILE": "/var/lib/node_exporter/mofed.prom"})
    assert r.returncode == 0, r.stderr[-2000:]

    ready = cli(root, "probe", "ready")
    assert ready.returncode == 0, ready.stdout
    assert ready.stdout.startswith("ready: pass: driver 25.07-0.9.7 loaded = installed = marker")
    assert "4 VF(s) restored" in ready.stdout
    assert cli(root, "probe", "startup").returncode == 0
    live = cli(root, "probe", "live")  # --once exited: nobody is beating any more
    assert live.returncode == 1 and "the daemon exited" in live.stdout

    st = json.loads(cli(root, "status", "--json").stdout)
    assert st["state"] == "serve" and st["last_transition"]["from"] == "ready"
    assert all(v["loaded"] == v["installed"] for v in st["driver"]["modules"].values())
    assert st["marker"]["set"] and st["driver"]["version_marker"] == "25.07-0.9.7"
    assert st["vfs"]["restored"] == 4 and st["vfs"]["failed"] == []
    assert st["lock"]["pid"] and st["lock"]["running"] is False
    assert st["last_error"] is None and st["stop_budget_s"] > 600
    screen = cli(root, "status").stdout
    for line in ("state        serve since", "transition   ready -> serve", "  mlx5_core  loaded",
                 "VFs          4 restored, 0 failed", "lock         PID", "last error   -"):
        assert line in screen, screen

    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(
                   (root / "var/lib/node_exporter/mofed.prom").read_text()) for s in fam.samples}
    assert metrics[("mofed_lifecycle_state", (("mofed_lifecycle_state", "serve"),))] == 1
    assert metrics[("mofed_lifecycle_state", (("mofed_lifecycle_state", "reload"),))] == 0
    assert metrics[("mofed_lifecycle_reloads_total", ())] == 1
    assert metrics[("mofed_lifecycle_ready", ())] == 1
    assert metrics[("mofed_lifecycle_vfs_restored", ())] == 4
    assert metrics[("mofed_lifecycle_vfs_failed", ())] == 0
    assert metrics[("mofed_lifecycle_phase_duration_seconds", (("phase", "reload"),))] > 0
    assert metrics[("mofed_lifecycle_last_error_info", (("error", ""),))] == 1


def test_partial_restore_is_ready_only_when_the_daemon_was_told_to_accept_it(tiny):
    root, _k = tiny
    assert lifecycle(root, "--once").returncode == 0
    journal_path = root / JDIR / "journal.json"
    doc = json.loads(journal_path.read_text())
    doc["facts"].update(restore_pending=True,
                        restore={"restored": 3, "failed": {"0000:08:00.4": "no netdev"}})
    journal_path.write_text(json.dumps(doc))
    ok = probe_ready(sim_tools(root), CONFIG)
    assert ok.ok and "1 VF(s) not restored" in ok.message and "0000:08:00.4" in ok.message
    strict = load_config({"READY_ON_PARTIAL_RESTORE": "false"}, require_driver_version=False)
    assert not probe_ready(sim_tools(root), strict).ok
    doc["facts"]["restore"] = None  # pending with nothing failed: the restore has not run yet
    journal_path.write_text(json.dumps(doc))
    assert "has not finished" in probe_ready(sim_tools(root), CONFIG).message


def test_live_passes_while_the_daemon_beats_and_fails_on_a_stale_or_hung_heartbeat(tiny):
    root, _k = tiny
    proc = lifecycle(root, env={"HEARTBEAT_INTERVAL_SEC": "0.2"}, wait=False)
    try:
        beat_path = root / JDIR / HEARTBEAT_FILE
        wait_for(lambda: (root / MARKER).exists() and json.loads(beat_path.read_text())["state"]
                 == "serve", "a heartbeat while serving")
        live = cli(root, "probe", "live")
        assert live.returncode == 0 and "state serve" in live.stdout, live.stdout
        assert cli(root, "probe", "startup").returncode == 0
        assert probe_live(root, CONFIG, now=time.time() + 60).message.startswith(
            "heartbeat stale: last beat")  # as kubelet would see it a minute after a hang
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "exited" in probe_live(root, CONFIG).message
    beat = json.loads(beat_path.read_text())
    beat.update(running=True, at=time.time() - 1000)
    beat_path.write_text(json.dumps(beat))
    stale = cli(root, "probe", "live")
    assert stale.returncode == 1 and "heartbeat stale: last beat 1000" in stale.stdout
    assert cli(root, "probe", "live", "--max-age", "2000").returncode == 0
    assert not (root / MARKER).exists() and not probe_startup(root, CONFIG).ok
    beat.update(at=time.time(), overdue=True, state="reload", state_budget_s=1922.0,
                state_since=time.time() - 5000)
    beat_path.write_text(json.dumps(beat))
    hung = probe_live(root, CONFIG)
    assert not hung.ok and "past its budget" in hung.message


def test_status_on_a_node_where_the_daemon_never_ran(tmp_path):
    r = cli(tmp_path, "status")
    assert r.returncode == 0 and "never ran here" in r.stdout
    assert "lock         -" in r.stdout


def test_metrics_path_must_be_a_prom_file():
    from mofed_lifecycle.config import ConfigError

    try:
        load_config({"METRICS_TEXTFILE": "/var/lib/node_exporter/mofed.txt"},
                    require_driver_version=False)
    except ConfigError as e:
        assert "METRICS_TEXTFILE" in str(e) and ".prom" in str(e)
    else:
        raise AssertionError("a non-.prom metrics path was accepted")
    assert load_config({}, require_driver_version=False).metrics_textfile == ""


def test_live_knows_the_state_from_the_first_beat_and_a_starting_daemon_is_not_a_dead_one(tiny):
    """Item 7: `probe live` right after a (re)start: the first beat names the state; before it,
    a daemon that holds the lock is "starting", not "exited" (a predecessor's last beat)."""
    root, _k = tiny
    beat_path = root / JDIR / HEARTBEAT_FILE
    beat_path.parent.mkdir(parents=True, exist_ok=True)
    beat_path.write_text(json.dumps({"pid": 1, "running": False, "at": time.time() - 30,
                                     "state": "stopped", "interval_s": 10}))
    assert "exited" in probe_live(root, CONFIG).message  # a predecessor's, nobody holds the lock
    # a process holding the run lock (as `run` does before its first beat)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from mofed_lifecycle.host.files import InstanceLock; "
         "InstanceLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
         str(root / "run/mellanox/drivers/.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        starting = cli(root, "probe", "live")
        assert starting.returncode == 0 and f"pid {holder.pid}) is starting" in starting.stdout
    finally:
        holder.kill()
        holder.wait()
    assert not probe_live(root, CONFIG).ok  # the holder died: no daemon at all
    proc = lifecycle(root, env={"HEARTBEAT_INTERVAL_SEC": "30"}, wait=False)
    try:
        wait_for(lambda: json.loads(beat_path.read_text())["pid"] == proc.pid, "the first beat")
        first = json.loads(beat_path.read_text())
        assert first["running"] and first["state"]  # "lock" at least, never null
        live = probe_live(root, CONFIG)
        assert live.ok and "state None" not in live.message, live.message
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        proc.kill()


def test_modules_a_swap_could_not_load_back_are_named_in_status_and_metrics(make_node, tmp_path):
    from mofed_lifecycle.metrics import Metrics

    from .test_lifecycle import STORAGE
    from .test_no_harm import sim

    root, _k = make_node(STORAGE.replace('loaded_version = "24.10-1.1.4"',
                                         'loaded_version = "25.07-0.9.7"'), "notloaded")
    assert sim("set", "--root", str(root), "module-unload", "nvme_rdma").returncode == 0
    journal = root / JDIR / "journal.json"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(json.dumps({"state": "failed", "since": time.time(), "pid": 1,
                                   "facts": {"not_reloaded": ["nvme_rdma"]}, "history": []}))
    st = json.loads(cli(root, "status", "--json").stdout)
    assert st["modules_not_reloaded"] == ["nvme_rdma"]
    assert "NOT LOADED   nvme_rdma" in cli(root, "status").stdout
    # an operator loads it by hand: status stops saying it is missing
    assert sim("set", "--root", str(root), "module-load", "nvme_rdma").returncode == 0
    assert json.loads(cli(root, "status", "--json").stdout)["modules_not_reloaded"] == []
    assert "NOT LOADED" not in cli(root, "status").stdout

    prom = tmp_path / "m.prom"
    m = Metrics(prom, driver_version="25.07-0.9.7")
    m.entered("failed", time.time(), {"not_reloaded": ["nvme_rdma", "mlx5_fwctl"]})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    assert samples[("mofed_lifecycle_modules_not_reloaded", (("module", "nvme_rdma"),))] == 1
    m.entered("inspect", time.time(), {"not_reloaded": []})
    assert "modules_not_reloaded{" not in prom.read_text()
