"""Issue 11: faults and bad input — nothing clobbered, nobody else's file touched (ground truth)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mofed_lifecycle.host.files import atomic_write_text

from .test_lifecycle import lifecycle
from .test_no_harm import MATCHING, reloads

BLACKLIST = "etc/modprobe.d/blacklist-ofed-modules.conf"  # /host/etc/... on the simulated node
USER_FILE = "# the site's own modprobe policy\nblacklist floppy\noptions mlx5_core prof_sel=2\n"


def test_a_users_file_at_the_blacklist_path_survives_a_restart_and_a_reload(make_node):
    root, k = make_node(MATCHING, "userfile")
    path = root / BLACKLIST
    path.write_text(USER_FILE)
    r = lifecycle(root, "--once")  # nothing to reload: the file is not even read
    assert r.returncode == 0, r.stderr[-2000:]
    assert path.read_text() == USER_FILE and '"blacklist.not_ours"' in r.stderr
    assert "stale_removed" not in r.stderr
    upgrade = MATCHING.replace('loaded_version = "25.07-0.9.7"', 'loaded_version = "24.10-1.1.4"')
    root, k = make_node(upgrade, "userfile-reload")
    path = root / BLACKLIST
    path.write_text(USER_FILE)
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    assert reloads(root) == 1 and path.read_text() == USER_FILE  # back, byte for byte
    st = k.call("state")
    assert st["pfs"]["0000:08:00.0"]["numvfs"] == 2 and st["markers"]
    assert not list((root / "run/mellanox/drivers/mofed-lifecycle").glob("blacklist-saved*"))


def test_atomic_writes_never_follow_a_planted_symlink(tmp_path: Path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    d = tmp_path / "drivers"
    d.mkdir()
    # the old predictable temporary names (PID 1 in a container) and the target itself
    for pid in (1, os.getpid()):
        (d / f".status.json.{pid}.tmp").symlink_to(outside)
    (d / "status.json").symlink_to(outside)
    atomic_write_text(d / "status.json", "{}\n")
    assert outside.read_text() == "precious\n"
    assert not (d / "status.json").is_symlink() and (d / "status.json").read_text() == "{}\n"
    assert sorted(p.name for p in d.iterdir() if not p.is_symlink()) == ["status.json"]


EXAMPLE_50 = (Path(__file__).resolve().parent.parent
              / "mofed_lifecycle/sim/examples/upgrade-50vf-eth.toml")


def test_restore_driver_on_termination_keeps_every_vf_across_a_stop_and_a_start(make_node):
    """Item 1: the inbox restore on stop is a reload like any other: VFs saved before it and
    restored after it; the next start (vendor driver again) restores them once more."""
    import signal

    from .test_lifecycle import MARKER, wait_for
    from .test_no_harm import vf_fields

    # a NIC that probes 8 VFs at once: three restores of 50 VFs here, none about probe order
    root, k = make_node(EXAMPLE_50.read_text().replace("[udev]\n", "[udev]\nprobe_parallel = 8\n"),
                        "inbox")
    env = {"RESTORE_DRIVER_ON_POD_TERMINATION": "true"}
    proc = lifecycle(root, env=env, wait=False)
    try:
        wait_for(lambda: (root / MARKER).exists(), "ready", timeout=90)
        ready = k.call("state")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    stopped = k.call("state")
    pf = "0000:3b:00.0"
    assert stopped["driver"]["loaded_version"] != ready["driver"]["loaded_version"]  # inbox back
    assert stopped["pfs"][pf]["numvfs"] == 50
    assert (stopped["pfs"][pf]["mtu"], stopped["pfs"][pf]["up"]) == (
        ready["pfs"][pf]["mtu"], ready["pfs"][pf]["up"])
    assert vf_fields(stopped) == vf_fields(ready)
    r = lifecycle(root, "--once", env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    again = k.call("state")
    assert again["driver"]["loaded_version"] == ready["driver"]["loaded_version"]
    assert vf_fields(again) == vf_fields(ready)
    assert again["pfs"][pf]["mtu"] == ready["pfs"][pf]["mtu"]


JDIR = "run/mellanox/drivers/mofed-lifecycle"


def test_a_damaged_snapshot_or_journal_is_never_nothing_to_do(make_node):
    """Item 3: after a reload whose restore is pending, garbage in the snapshot is survived from
    its copy; garbage in both is a loud failure (not ready), never "no restore pending"; a journal
    with wrong JSON types falls back to its copy instead of crashing every start."""
    import json

    from .test_lifecycle import MARKER, events

    late = MATCHING.replace('loaded_version = "25.07-0.9.7"', 'loaded_version = "24.10-1.1.4"')
    late = late.replace("netdev_delay_s = 0.3", "netdev_delay_s = 0.3\nlate_vfs = { 1 = 300.0 }\n"
                                                "probe_parallel = 8")
    root, k = make_node(late, "damaged")
    env = {"VF_RESTORE_TIMEOUT_SEC": "1", "READY_ON_PARTIAL_RESTORE": "false"}
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 1  # VF 1 is late: the restore stays pending
    jdir = root / JDIR
    assert json.loads((jdir / "journal.json").read_text())["facts"]["restore_pending"] is True
    (jdir / "sriov-snapshot.json").write_text('{"taken_at": 1, "pfs": [')  # torn
    k.call("wait_settled", timeout=60)  # the late VF's netdev appears meanwhile
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    used = next(e for e in events(r.stderr) if e["event"] == "snapshot.damaged")["used"]
    assert used.endswith("sriov-snapshot.copy.json")
    assert (root / MARKER).exists()

    root, k = make_node(late, "damaged-both")
    assert lifecycle(root, "--once", env=env).returncode == 1
    for name in ("sriov-snapshot.json", "sriov-snapshot.copy.json"):
        (root / JDIR / name).write_bytes(b"\xff\x00")
    r = lifecycle(root, "--once", env=env)
    assert r.returncode == 1 and not (root / MARKER).exists()
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert "saved snapshot is damaged" in failed["error"] and "Traceback" not in r.stderr
    status = json.loads((root / JDIR / "status.json").read_text())
    assert "snapshot is damaged" in status["last_error"]

    (root / JDIR / "journal.json").write_text('{"facts": [], "history": 3}')  # wrong types
    r = lifecycle(root, "--once", env=env)
    assert "Traceback" not in r.stderr
    damaged = next(e for e in events(r.stderr) if e["event"] == "journal.damaged")
    assert damaged["used"].endswith("journal.copy.json")


@pytest.mark.parametrize("env,says", [
    ({}, "DRIVER_READY_PATH='/run/mellanox/drivers/.driver-ready': "),  # made a directory below
    ({"LOCK_FILE_PATH": "/proc/modules/lock"}, "is a file, so nothing can be created under it"),
    ({"MLX_DRIVERS_MOUNT": "/proc/modules"}, "is a file, not a directory"),
    ({"ENTRYPOINT_DEBUG": "true", "DEBUG_LOG_FILE": "/"}, "DEBUG_LOG_FILE='/': "),
    ({"METRICS_TEXTFILE": "/proc/modules/x.prom"}, "METRICS_TEXTFILE='/proc/modules/x.prom'"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_path_the_daemon_cannot_write_is_refused_naming_the_variable(tiny, env, says, dry_run):
    """Items 12: a directory where a file goes, a file where a directory goes: exit 2, one line
    naming the variable, before anything is written (the dry run says the same)."""
    root, k = tiny
    before = k.call("state")
    if not env:
        (root / "run/mellanox/drivers/.driver-ready").mkdir(parents=True)
    r = lifecycle(root, "--dry-run" if dry_run else "--once", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("mofed-lifecycle: ") and says in line, line
    after = k.call("state")
    assert after["modules"] == before["modules"] and after["blacklist_files"] == []


TINY = (Path(__file__).resolve().parent / "scenarios/tiny-eth.toml").read_text()


@pytest.mark.parametrize("name,text,says", [
    ("nested", "x = " + "[" * 5000 + "]" * 5000 + "\n" + TINY, "nested too deeply"),
    ("inf", TINY.replace("time_scale = 0.01", "time_scale = inf"),
     "node.time_scale: expected a finite number"),
    ("nan-delay", TINY.replace("netdev_delay_s = [0.5, 2.0]", "netdev_delay_s = [0.5, nan]"),
     "udev.netdev_delay_s[1]: expected a finite number"),
    ("pf-string", 'pf = "x"\n' + TINY.split("[[pf]]")[0], "pf: expected list"),
    ("dotdot", TINY.replace('name = "enp8s0f0np0"', 'name = ".."'), "name: invalid value '..'"),
    ("huge", TINY.replace('name = "enp8s0f0np0"', 'name = "' + "x" * 3_000_000 + '"'),
     "name: invalid value"),
])
def test_a_bad_scenario_is_one_short_line_exit_2_and_no_half_built_node(tmp_path, name, text,
                                                                         says):
    """Item 11: deep nesting, inf/nan, a PF that is not a table, a PF named "..", a huge value."""
    import subprocess
    import sys

    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    root = tmp_path / "node"
    r = subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "sim", "init", str(path),
                        "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr[:300]
    assert r.stderr.count("\n") == 1 and len(r.stderr) < 700 and "Traceback" not in r.stderr
    assert not root.exists()


@pytest.mark.parametrize("attr,value", [
    ("sriov_numvfs", b"four\n"), ("sriov_numvfs", b"99999999999\n"), ("sriov_numvfs", b"\xff\xfe"),
    ("sriov_drivers_autoprobe", b"7\n")])
def test_garbage_in_sysfs_stops_the_snapshot_before_anything_is_touched(tiny, attr, value):
    """Item 4: a value the daemon cannot read stops the step with the file and the value named;
    the node is untouched (no reload, VFs as they were), never a default that loses VFs."""
    from .test_lifecycle import events

    root, k = tiny
    before = k.call("state")
    (root / "sys/bus/pci/devices/0000:08:00.0" / attr).write_bytes(value)
    r = lifecycle(root, "--once")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert failed["state"] == "snapshot" and attr in failed["error"]
    assert "nothing was changed" in failed["error"]
    after = k.call("state")
    assert reloads(root) == 0 and after["pfs"] == before["pfs"]
    assert after["blacklist_files"] == []


def test_a_command_is_judged_by_its_own_exit_and_bounded_whatever_its_children_do():
    """Item 6: a child left holding stdout neither makes a finished command look timed out nor
    keeps us waiting; a command that overruns is killed and we return even if a child that left
    its process group still holds the pipe."""
    import time

    import pytest as _pytest

    from mofed_lifecycle.host.commands import DRAIN_S, CommandTimeout, run_command

    # exits 0 at once, leaving a child (same group) that keeps stdout open for 30 s
    start = time.monotonic()
    r = run_command(["sh", "-c", "echo swapped; sleep 30 & exit 0"], timeout_s=10)
    took = time.monotonic() - start
    assert r.ok and "swapped" in r.stdout and took < 10  # not a timeout, not 30 s
    # overruns; its child escapes the group (setsid) and holds stdout for 60 s
    start = time.monotonic()
    with _pytest.raises(CommandTimeout):
        run_command(["sh", "-c", "setsid sleep 60 & sleep 60"], timeout_s=1)
    assert time.monotonic() - start < 1 + DRAIN_S + 20  # bounded, not 60 s


MIXED = (Path(__file__).parent / "scenarios" / "mixed-4pf.toml").read_text()


@pytest.mark.parametrize("field,value", [
    ("driver", "../../../../planted"),  # /sys/bus/pci/drivers/<driver>/bind
    ("pci", "../../../../planted"),  # /sys/bus/pci/devices/<pci>/...
    ("netdev", "../planted"),
])
def test_a_planted_path_in_the_snapshot_never_reaches_a_write(make_node, field, value):
    """Item 9: names read back from the snapshot steer sysfs writes; one that is not a name the
    kernel allows makes the file damaged: the copy is used, and with both planted the restore
    stops loudly, before any write. On the red team's 4-PF mixed node, killed mid-swap."""
    import json
    import signal

    from .test_lifecycle import MARKER, events
    from .test_no_harm import vf_fields

    root, k = make_node(MIXED, f"planted-{field}")
    before = k.call("state")
    r = lifecycle(root, "--once", env={"MOFED_LIFECYCLE_CRASH_AT": "unblacklist"})
    assert r.returncode == -signal.SIGKILL
    (root / "planted").mkdir()  # where a traversal would land: a write there would succeed
    snap = root / JDIR / "sriov-snapshot.json"
    doc = json.loads(snap.read_text())
    doc["pfs"][3]["vfs"][1][field] = value  # the VM's VF on vfio-pci
    snap.write_text(json.dumps(doc))
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    damaged = next(e for e in events(r.stderr) if e["event"] == "snapshot.damaged")
    assert f"bad {field}" in damaged["damaged"] or "bad PCI" in damaged["damaged"]
    assert damaged["used"].endswith("sriov-snapshot.copy.json")
    assert vf_fields(k.call("state")) == vf_fields(before)  # restored from the copy
    assert list((root / "planted").iterdir()) == []

    root, k = make_node(MIXED, f"planted-both-{field}")
    r = lifecycle(root, "--once", env={"MOFED_LIFECYCLE_CRASH_AT": "unblacklist"})
    (root / "planted").mkdir()
    for name in ("sriov-snapshot.json", "sriov-snapshot.copy.json"):
        (root / JDIR / name).write_text(json.dumps(doc))
    r = lifecycle(root, "--once")
    assert r.returncode == 1 and not (root / MARKER).exists() and "Traceback" not in r.stderr
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert "saved snapshot is damaged" in failed["error"] and value in failed["error"]
    assert list((root / "planted").iterdir()) == []
    assert k.call("state")["blacklist_files"] == []


def test_facts_that_must_be_durable_are_not_kept_when_the_journal_cannot_be_written(tmp_path):
    """Item 5: a fact the node is touched on (restore pending, the modules owed) is committed
    only if it reaches the disk; otherwise memory is put back as it was, so a later start never
    acts on a fact that was refused (e.g. merging a stale snapshot over an operator's changes)."""
    from mofed_lifecycle.lifecycle.journal import Journal

    seen: list[str | None] = []
    j = Journal(tmp_path, on_unsaved=seen.append)
    j.set(restore_pending=False)
    assert j.unsaved is None and not seen
    (tmp_path / "journal.json").unlink()
    (tmp_path / "journal.json").mkdir()  # the next replace of journal.json fails (EISDIR)
    assert j.commit(restore_pending=True, restored_vfs=[]) is False
    assert j.facts["restore_pending"] is False and "restored_vfs" not in j.facts
    assert j.unsaved and "journal.json" in j.unsaved and seen == [j.unsaved]
    (tmp_path / "journal.json").rmdir()
    assert j.commit(restore_pending=True) is True and seen[-1] is None  # saved again


def test_the_snapshot_check_accepts_every_legitimate_shape_and_names_what_it_refuses():
    """Item 9: no false positive (a refused snapshot read back after the reload would lose the
    VFs): IB hardware addresses, unknown MTU/MAC, VMD PCI domains, vfio and unbound VFs pass;
    a traversal in any name, or a value the kernel would misread, is named."""
    from dataclasses import replace

    from mofed_lifecycle.host.netlink_types import VfSettings
    from mofed_lifecycle.sriov.model import PfSnapshot, RepSnapshot, Snapshot, VfSnapshot
    from mofed_lifecycle.sriov.validate import snapshot_problem

    ib_addr = ":".join(["80"] + ["fe"] * 19)
    vfs = (VfSnapshot(0, "10000:e1:00.2", VfSettings(0, node_guid="00:11:22:33:44:55:66:77",
                                                     port_guid="00:11:22:33:44:55:66:78"),
                      "mlx5_core", "ibp225s0v0", 4092, True),
           VfSnapshot(1, "10000:e1:00.3", VfSettings(1, mac="02:AB:00:00:00:01", vlan=4095,
                                                     qos=7, link_state="enable"), "vfio-pci"),
           VfSnapshot(2, "10000:e1:00.4", VfSettings(2), None, mtu=0))
    pf = PfSnapshot("10000:e1:00.0", "ibp225s0", 32, 0, None, ib_addr, None, 3, True, vfs,
                    (RepSnapshot(0, "pf0vf0", None, None),), ifindex=7)
    good = Snapshot(1.0, (pf, replace(pf, pci="0000:08:00.0", netdev=None, mac="", vfs=(),
                                      eswitch="switchdev", link_type=1)))
    assert snapshot_problem(good) is None
    for bad, says in [
        (replace(pf, pci="../../x"), "bad PCI address"),
        (replace(pf, netdev="a/b"), "bad netdev name 'a/b'"),
        (replace(pf, eswitch="switchdev\n"), "bad eswitch mode"),
        (replace(pf, vfs=(replace(vfs[1], driver=".."),)), "bad driver '..'"),
        (replace(pf, vfs=(replace(vfs[1], settings=VfSettings(1, vlan=4096)),)), "bad VLAN"),
        (replace(pf, representors=(RepSnapshot(0, "..", None, None),)), "representor name"),
        (replace(pf, vfs=(vfs[0], vfs[0])), "listed twice"),
    ]:
        problem = snapshot_problem(Snapshot(1.0, (bad,)))
        assert problem is not None and says in problem, (says, problem)


def test_a_journal_from_a_newer_daemon_is_refused_by_name_never_misread(tmp_path):
    """The journal is versioned on disk; one without a version (older daemons) is read, one from
    a newer daemon is a damaged record naming the version (the daemon stays not ready)."""
    import json

    from mofed_lifecycle.lifecycle.journal import JOURNAL_VERSION, Journal

    old = {"state": "serve", "facts": {"restore_pending": True}, "history": []}
    (tmp_path / "journal.json").write_text(json.dumps(old))
    j = Journal(tmp_path)
    assert j.damaged is None and j.facts["restore_pending"] is True
    j.start_run()
    assert json.loads((tmp_path / "journal.json").read_text())["version"] == JOURNAL_VERSION
    newer = {**old, "version": JOURNAL_VERSION + 1}
    for name in ("journal.json", "journal.copy.json"):
        (tmp_path / name).write_text(json.dumps(newer))
    j = Journal(tmp_path)
    assert j.facts == {} and j.damaged and "written by a newer mofed-lifecycle" in j.damaged
    j.start_run()
    j.set(last_error="inspect: the journal is damaged")  # what a refusing run writes
    for name in ("journal.json", "journal.copy.json"):  # left as they were: refused again
        assert json.loads((tmp_path / name).read_text()) == newer
    assert Journal(tmp_path).damaged
    assert "damaged" in json.loads((tmp_path / "status.json").read_text())["last_error"]
