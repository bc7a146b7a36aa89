"""`run sources` on simulated nodes ([build], contract version 2), checked on the ground truth:
the modules the kernel holds, the VFs, the host's files, the inventory, the processes left.

The stand-in install.pl takes `build_s` (scaled) and fails the first `build_failures` times; its
records (`.sim/build.jsonl`) count the builds, not the daemon's word.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mofed_lifecycle.provision.plan import (
    DTK_HEARTBEAT,
    START_FLAG,
    done_flag_name,
    sanitise_kernel,
)
from mofed_lifecycle.sim.build import build_env, read_record
from mofed_lifecycle.sim.run import run_scenario
from mofed_lifecycle.sim.scenario_parse import parse_scenario

from .conftest import SCENARIOS
from .test_lifecycle import MARKER, events, journal_states, lifecycle, wait_for
from .test_no_harm import vf_fields

SOURCES = (SCENARIOS / "build-sources.toml").read_text()
COMPARED = ("mlx5_core", "mlx5_ib", "ib_core")
INVENTORY = "mnt/drivers-inventory"


def variant(mode: str = "sources", **build: object) -> str:
    text = SOURCES.replace('mode = "sources"', f'mode = "{mode}"')
    for key, value in build.items():  # in [build], the last table
        text = re.sub(rf"^{key} = .*$\n?", "", text, flags=re.M) + f"{key} = {json.dumps(value)}\n"
    return text


def env_of(text: str, **extra: str) -> dict[str, str]:
    return {**build_env(parse_scenario(text)), "RECHECK_INTERVAL_SEC": "0.2",
            "BUILD_PROGRESS_SEC": "0.1", **extra}


def builds(root: Path) -> list[str]:
    return [r["event"] for r in read_record(root) if r["event"].startswith("build.")]


def node_truth(k) -> dict:
    st = k.call("state")
    return {"modules": {m: v["srcversion"] for m, v in st["modules"].items()},
            "vfs": vf_fields(st), "blacklist": st["blacklist_files"],
            "marker": st["markers"].get(MARKER, False)}


def installed_driver_loaded(k, text: str) -> bool:
    sc = parse_scenario(text)
    mods = k.call("state")["modules"]
    return all(mods.get(m, {}).get("srcversion") == sc.installed_srcversion(m) for m in COMPARED)


def new_container(root: Path, text: str) -> None:
    """A restarted pod: the image's own /lib/modules again (the packages installed by the last
    container are gone with it); the node (host, inventory, run/) is as it was."""
    kernel = parse_scenario(text).kernel
    for ko in (root / "lib/modules" / kernel / "updates").glob("*.ko"):
        if "peermem" not in ko.name:
            ko.unlink()


# ---- sources: cold cache, warm cache ---------------------------------------------------------


def test_a_cold_cache_builds_once_then_a_restart_installs_from_the_cache_without_building(
        make_node):
    root, k = make_node(SOURCES)
    before = node_truth(k)
    r = lifecycle(root, "sources", "--once", env=env_of(SOURCES))
    assert r.returncode == 0, r.stderr[-3000:]
    assert builds(root) == ["build.start", "build.end"]
    assert installed_driver_loaded(k, SOURCES) and node_truth(k)["marker"]
    assert node_truth(k)["vfs"] == before["vfs"]  # the VFs came back as they were
    kernel = parse_scenario(SOURCES).kernel
    entry = root / INVENTORY / kernel / "25.07-0.9.7"
    assert [p.suffix for p in entry.iterdir()] == [".deb"]
    assert (entry.parent / "25.07-0.9.7.checksum").read_text().startswith("sha256:")
    assert "APPEND_DRIVER_BUILD_FLAGS=\n" in (entry.parent / "25.07-0.9.7.buildconfig").read_text()
    assert journal_states(root)[:3] == ["lock", "provision", "inspect"]

    new_container(root, SOURCES)
    r = lifecycle(root, "sources", "--once", env=env_of(SOURCES))
    assert r.returncode == 0, r.stderr[-3000:]
    assert builds(root) == ["build.start", "build.end"]  # no second build
    hit = next(e for e in events(r.stderr) if e["event"] == "inventory.hit")
    assert hit["entry"].endswith(f"{kernel}/25.07-0.9.7")
    assert [e for e in events(r.stderr) if e["event"] == "openibd.restart"] == []  # no reload
    assert installed_driver_loaded(k, SOURCES) and node_truth(k)["marker"]


def test_a_warm_cache_from_sim_init_is_installed_without_a_build():
    r = run_scenario(SCENARIOS / "build-sources-warm.toml")
    rep = r.report
    assert rep["outcome"] == "ready", r.log_tail
    assert rep["provision"] == {"mode": "sources", "cache_hit": True, "builds": 0,
                                "failed_builds": 0}
    assert rep["build_s"] is None and rep["reloaded"] is True


@pytest.mark.parametrize(("change", "why"), [
    ("flags", "another configuration"), ("corrupt", "do not match its checksum"),
    ("partial", "no checksum file")])
def test_a_mismatched_or_corrupt_cache_entry_is_rebuilt(make_node, change, why):
    root, k = make_node(SOURCES)
    assert lifecycle(root, "sources", "--once", env=env_of(SOURCES)).returncode == 0
    kernel = parse_scenario(SOURCES).kernel
    kdir = root / INVENTORY / kernel
    env = env_of(SOURCES)
    if change == "flags":
        env["APPEND_DRIVER_BUILD_FLAGS"] = "--with-nfsrdma --without-mlx5-ipsec"
    elif change == "corrupt":
        pkg = next((kdir / "25.07-0.9.7").iterdir())
        pkg.write_bytes(pkg.read_bytes()[:-10])
    else:
        (kdir / "25.07-0.9.7.checksum").unlink()
    (kdir.parent / "4.18.0-old").mkdir()  # an old kernel's entry, cleaned
    (kdir / "24.10-1.1.4").mkdir()  # an old version's, cleaned
    new_container(root, SOURCES)
    r = lifecycle(root, "sources", "--once", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    needed = next(e for e in events(r.stderr) if e["event"] == "build.needed")
    assert why in needed["why"]
    assert builds(root) == ["build.start", "build.end"] * 2
    assert sorted(p.name for p in kdir.parent.iterdir()) == [kernel]
    assert sorted(p.name for p in kdir.iterdir()) == [
        "25.07-0.9.7", "25.07-0.9.7.buildconfig", "25.07-0.9.7.checksum"]
    if change == "flags":  # the flags reached install.pl and the cache's key
        start = [x for x in read_record(root) if x["event"] == "build.start"][-1]
        assert start["argv"][-2:] == ["--with-nfsrdma", "--without-mlx5-ipsec"]
        assert "--without-mlx5-ipsec" in (kdir / "25.07-0.9.7.buildconfig").read_text()
    assert installed_driver_loaded(k, SOURCES)


# ---- a failing build --------------------------------------------------------------------------


def test_a_failing_build_says_why_leaves_the_node_untouched_and_is_retried(make_node):
    text = variant(build_failures=1)
    root, k = make_node(text)
    before = node_truth(k)
    r = lifecycle(root, "sources", "--once", env=env_of(text))
    assert r.returncode == 1
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert failed["state"] == "provision" and "install.pl exited 1" in failed["error"]
    assert "Error 1" in failed["error"] and "build.log" in failed["error"]  # the log's tail
    assert "the node is untouched" in failed["error"]
    assert node_truth(k) == before  # modules, VFs, blacklist, no marker
    assert (root / "run/mellanox/drivers/mofed-lifecycle/build.log").read_text().count(
        "Building") == 10

    # the daemon (not --once) retries at its re-check and gets there
    root2, k2 = make_node(text, "daemon")
    proc = lifecycle(root2, "sources", env=env_of(text), wait=False)
    try:
        wait_for(lambda: (root2 / MARKER).exists(), "the marker after the retried build", 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert builds(root2) == ["build.start", "build.fail", "build.start", "build.end"]
    states = journal_states(root2)
    assert states[:4] == ["lock", "provision", "failed", "provision"]
    assert installed_driver_loaded(k2, text)


def test_missing_headers_are_named_before_any_build(make_node):
    root, k = make_node(SOURCES)
    kernel = parse_scenario(SOURCES).kernel
    (root / "lib/modules" / kernel / "build/Makefile").unlink()
    (root / "lib/modules" / kernel / "build").rmdir()
    r = lifecycle(root, "sources", "--once", env=env_of(SOURCES))
    assert r.returncode == 1 and builds(root) == []
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert f"the kernel headers for {kernel}" in failed["error"]
    assert f"linux-headers-{kernel}" in failed["error"]


def test_a_build_past_its_deadline_is_killed_and_reported_with_its_tail(make_node):
    text = variant(build_s=3000)  # 30 s scaled
    root, k = make_node(text)
    r = lifecycle(root, "sources", "--once", env=env_of(text, BUILD_TIMEOUT_SEC="1"))
    assert r.returncode == 1
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert "did not finish within 1s (BUILD_TIMEOUT_SEC)" in failed["error"]
    assert "Building mlnx-ofa_kernel" in failed["error"]
    progress = [e for e in events(r.stderr) if e["event"] == "command.progress"]
    assert len(progress) >= 5 and progress[0]["what"] == "build the driver"  # every 0.1 s
    assert not installed_driver_loaded(k, text)
    assert not _install_pl_running(root)


def test_sources_mode_without_its_source_tree_is_refused_at_start(tiny):
    root, _k = tiny
    r = lifecycle(root, "sources", "--once", env={"NVIDIA_NIC_DRIVER_PATH": ""})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "mofed-lifecycle: `run sources` needs NVIDIA_NIC_DRIVER_PATH")


def _install_pl_running(root: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "install.pl" in cmd and str(root) in cmd:
            out.append(p.pid)
    return out


def test_sigterm_during_a_build_stops_it_and_the_daemon_cleanly(make_node):
    text = variant(build_s=3000)
    root, k = make_node(text)
    before = node_truth(k)
    proc = lifecycle(root, "sources", env=env_of(text), wait=False)
    try:
        wait_for(lambda: "build.start" in builds(root), "the build to start")
        wait_for(lambda: bool(_install_pl_running(root)), "install.pl running")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    evs = [e["event"] for e in events(err)]
    assert "command.stopped" in evs and "provision.stopped" in evs
    assert journal_states(root)[-2:] == ["stopping", "stopped"]
    wait_for(lambda: not _install_pl_running(root), "install.pl gone", 10)
    assert node_truth(k) == before


# ---- the DTK hand-off ---------------------------------------------------------------------------


def test_dtk_mode_end_to_end_builds_in_the_sidecar_and_notices_the_done_flag():
    r = run_scenario(SCENARIOS / "build-dtk.toml")
    rep = r.report
    assert rep["outcome"] == "ready", r.log_tail
    assert rep["provision"]["mode"] == "dtk" and rep["provision"]["builds"] == 1
    assert rep["provision"]["cache_hit"] is False
    assert rep["dtk_detect_s"] is not None and rep["dtk_detect_s"] >= 0
    assert rep["dtk_sidecar"] == {"exit_code": 0}  # stopped by SIGTERM, cleanly
    assert rep["build_s"] is not None and rep["reloaded"]


def sidecar(root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json", "dtk-build",
         "--root", str(root)], env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def shared(root: Path, text: str) -> Path:
    kernel = parse_scenario(text).kernel
    return root / "mnt/shared-doca-driver-toolkit" / sanitise_kernel(kernel)


def beat_phase(root: Path, text: str) -> str | None:
    try:
        return json.loads((shared(root, text) / DTK_HEARTBEAT).read_text())["phase"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_sidecar_killed_mid_build_is_reported_within_its_heartbeat_period(make_node):
    text = variant("dtk", build_s=3000)
    root, k = make_node(text)
    before = node_truth(k)
    env = env_of(text, HEARTBEAT_INTERVAL_SEC="2")
    side = sidecar(root, env)
    main = lifecycle(root, "sources", env=env, wait=False)
    try:
        wait_for(lambda: beat_phase(root, text) == "building", "the sidecar to build")
        side.kill()
        killed = time.time()
        side.communicate(timeout=10)
        wait_for(lambda: "failed" in journal_states(root), "the main container to notice", 20)
        noticed = time.time()
        main.send_signal(signal.SIGTERM)
        _out, err = main.communicate(timeout=30)
    finally:
        main.kill()
        side.kill()
    failed = next(e for e in events(err) if e["event"] == "step.failed")
    assert "the DTK sidecar died during the build" in failed["error"]
    assert "kubelet restarts it" in failed["error"]
    assert noticed - killed < 2.0  # within one heartbeat period (its lock is checked at 1/4)
    assert node_truth(k) == before
    assert main.returncode == 0


def test_sigterm_during_a_dtk_build_stops_both_containers_cleanly(make_node):
    text = variant("dtk", build_s=3000)
    root, k = make_node(text)
    before = node_truth(k)
    env = env_of(text, HEARTBEAT_INTERVAL_SEC="0.5")
    side = sidecar(root, env)
    main = lifecycle(root, "sources", env=env, wait=False)
    try:
        wait_for(lambda: beat_phase(root, text) == "building", "the sidecar to build")
        main.send_signal(signal.SIGTERM)
        side.send_signal(signal.SIGTERM)
        _out, main_err = main.communicate(timeout=30)
        _out, side_err = side.communicate(timeout=30)
    finally:
        main.kill()
        side.kill()
    assert (main.returncode, side.returncode) == (0, 0)
    assert "provision.stopped" in [e["event"] for e in events(main_err)]
    assert "dtk.build_stopped" in [e["event"] for e in events(side_err)]
    assert beat_phase(root, text) == "stopped"
    assert (shared(root, text) / START_FLAG).exists()  # a restarted sidecar builds again
    wait_for(lambda: not _install_pl_running(root), "install.pl gone", 10)
    assert node_truth(k) == before


UPSTREAM_LIKE_SIDECAR = """#!/bin/sh
# upstream's protocol, as its script follows it: dtk.env, a 0.1 s poll for the start flag, the
# build in MLNX_OFED_SRC-<version>, then the done flag; no heartbeat, no lock
. "$1/dtk.env"
while [ ! -f "$DTK_OCP_START_COMPILE_FLAG" ]; do sleep 0.1; done
# shellcheck disable=SC2086 (upstream splits the flags, which carry --kernel K)
"$DTK_OCP_NIC_SHARED_DIR/MLNX_OFED_SRC-$DTK_OCP_COMPILED_DRIVER_VER/install.pl" --build-only \\
    --kernel-only $APPEND_DRIVER_BUILD_FLAGS || exit 1
touch "$DTK_OCP_DONE_COMPILE_FLAG"
rm "$DTK_OCP_START_COMPILE_FLAG"
"""


def test_the_main_container_works_with_a_sidecar_speaking_only_upstreams_protocol(make_node,
                                                                                  tmp_path):
    text = variant("dtk")
    root, k = make_node(text)
    main = lifecycle(root, "sources", "--once", env=env_of(text), wait=False)
    try:
        wait_for(lambda: (shared(root, text) / "dtk.env").exists(), "the shared dir prepared")
        script = tmp_path / "upstream-sidecar.sh"
        script.write_text(UPSTREAM_LIKE_SIDECAR)
        up = subprocess.run(["sh", str(script), str(shared(root, text))], capture_output=True,
                            text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        _out, err = main.communicate(timeout=60)
    finally:
        main.kill()
    assert main.returncode == 0, err[-3000:]
    assert "dtk.no_heartbeat" in [e["event"] for e in events(err)]
    assert (shared(root, text) / done_flag_name("25.07-0.9.7")).exists()
    assert installed_driver_loaded(k, text)


def test_no_sidecar_at_all_is_an_error_at_the_dtk_deadline(make_node):
    text = variant("dtk")
    root, k = make_node(text)
    r = lifecycle(root, "sources", "--once", env=env_of(text, DTK_BUILD_TIMEOUT_SEC="1"))
    assert r.returncode == 1
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert "did not finish the build within 1s (DTK_BUILD_TIMEOUT_SEC)" in failed["error"]
    assert "openshift-driver-toolkit-ctr" in failed["error"]
    sh = shared(root, text)
    assert {"dtk.env", "dtk_nic_driver_build.sh", "entrypoint", START_FLAG} <= {
        p.name for p in sh.iterdir()}
    assert (sh / "MLNX_OFED_SRC-25.07-0.9.7" / "install.pl").is_file()
    assert (sh / "pylib" / "mofed_lifecycle" / "cli.py").is_file()


def test_dry_run_in_sources_mode_says_whether_it_would_build_and_why(make_node):
    root, _k = make_node(SOURCES)
    r = lifecycle(root, "sources", "--dry-run", env=env_of(SOURCES))
    assert r.returncode == 0 and r.stdout.startswith(
        "provision: would build the driver here with install.pl: no entry for this kernel")
    assert builds(root) == []  # nothing built, nothing installed
    assert lifecycle(root, "sources", "--once", env=env_of(SOURCES)).returncode == 0
    r = lifecycle(root, "sources", "--dry-run", env=env_of(SOURCES))
    assert "(the cache matches: no build)" in r.stdout.splitlines()[0]


def test_a_sidecar_restarted_after_dying_takes_the_build_and_the_node_gets_ready(make_node):
    text = variant("dtk", build_s=100)  # 1 s
    root, k = make_node(text)
    env = env_of(text, HEARTBEAT_INTERVAL_SEC="0.4")
    side = sidecar(root, env)
    main = lifecycle(root, "sources", env=env, wait=False)
    try:
        wait_for(lambda: beat_phase(root, text) == "building", "the sidecar to build")
        side.kill()
        side.communicate(timeout=10)
        wait_for(lambda: "failed" in journal_states(root), "the death noticed", 20)
        side = sidecar(root, env)  # kubelet restarts the container
        wait_for(lambda: (root / MARKER).exists(), "ready after the restarted sidecar", 60)
        main.send_signal(signal.SIGTERM)
        _out, err = main.communicate(timeout=30)
    finally:
        main.kill()
        side.send_signal(signal.SIGTERM)
        side.communicate(timeout=30)
    assert builds(root)[-1] == "build.end" and builds(root).count("build.end") == 1, \
        read_record(root)
    assert installed_driver_loaded(k, text) and main.returncode == 0
    died = [e for e in events(err) if e["event"] == "step.failed"]
    assert len(died) == 1 and "died during the build" in died[0]["error"]  # reported once


def test_a_main_container_restarted_mid_build_waits_for_the_build_under_way(make_node):
    text = variant("dtk", build_s=100)
    root, k = make_node(text)
    env = env_of(text, HEARTBEAT_INTERVAL_SEC="0.4")
    side = sidecar(root, env)
    main = lifecycle(root, "sources", env=env, wait=False)
    try:
        wait_for(lambda: beat_phase(root, text) == "building", "the sidecar to build")
        main.kill()  # the main container restarts; the sidecar builds on
        main.communicate(timeout=10)
        r = lifecycle(root, "sources", "--once", env=env)
    finally:
        main.kill()
        side.send_signal(signal.SIGTERM)
        side.communicate(timeout=30)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dtk.build_under_way" in [e["event"] for e in events(r.stderr)]
    assert builds(root) == ["build.start", "build.end"]  # one build, never cut short
    assert installed_driver_loaded(k, text)


def test_a_failed_rebuild_keeps_a_marker_that_is_still_true(make_node):
    """A new container whose build fails touched nothing: the marker of the driver loaded now
    stays (a watching peermem loader keeps nvidia_peermem)."""
    root, k = make_node(SOURCES)
    assert lifecycle(root, "sources", "--once", env=env_of(SOURCES)).returncode == 0
    marker = (root / MARKER).read_text()
    new_container(root, SOURCES)
    kernel = parse_scenario(SOURCES).kernel
    (root / INVENTORY / kernel / "25.07-0.9.7.checksum").unlink()  # the cache must rebuild
    (root / "lib/modules" / kernel / "build/Makefile").unlink()
    (root / "lib/modules" / kernel / "build").rmdir()  # ...and cannot: no headers
    r = lifecycle(root, "sources", "--once", env=env_of(SOURCES))
    assert r.returncode == 1
    assert "marker.kept" in [e["event"] for e in events(r.stderr)]
    assert (root / MARKER).read_text() == marker and installed_driver_loaded(k, SOURCES)


def test_the_cache_cleanup_deletes_only_what_looks_like_cache_entries(make_node):
    root, _k = make_node(SOURCES)
    inv = root / INVENTORY
    (inv / "4.18.0-old").mkdir(parents=True)
    (inv / "4.18.0-old" / "25.07-0.9.7.checksum").write_text("sha256:x\n")
    (inv / "site-notes").mkdir()
    (inv / "site-notes" / "README").write_text("not a cache entry\n")
    r = lifecycle(root, "sources", "--once", env=env_of(SOURCES))
    assert r.returncode == 0
    assert not (inv / "4.18.0-old").exists() and (inv / "site-notes" / "README").exists()
    left = next(e for e in events(r.stderr) if e["event"] == "inventory.not_ours")
    assert left["left"] == ["site-notes"]
