"""A full drivers mount (ENOSPC, from a real tmpfs) never leaves the host blacklist behind nor the
VFs gone: the swap under way is finished and unwound from memory, the VFs are restored, and only
then is the journal's failure reported (issue 11, item 5). On the red team's 4-PF mixed node."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import SCENARIOS
from .test_lifecycle import MARKER, events, lifecycle, wait_for
from .test_no_harm import sim, vf_fields

MIXED = (SCENARIOS / "mixed-4pf.toml").read_text()
DRIVERS = "run/mellanox/drivers"


def pf_shape(state: dict) -> dict:
    return {pci: (pf["numvfs"], pf.get("eswitch"), pf.get("mtu")) for pci, pf in
            state["pfs"].items()}


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(mount: Path, *, reserve_too: bool = True) -> Path:
    """Fill the filesystem to the last byte (ENOSPC on the next write of any file); with
    `reserve_too`, the journal's reserve is taken as well (as a runaway writer would)."""
    if reserve_too:
        (mount / "mofed-lifecycle/journal.reserve").unlink(missing_ok=True)
    ballast = mount / "ballast"
    with ballast.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return ballast


def fill_during_openibd(root: Path, mount: Path, *, reserve_too: bool
                        ) -> tuple[Path, subprocess.Popen, str]:
    """Start `run --once`, fill the mount while openibd restarts, wait for the exit:
    (the ballast, the process, its log)."""
    p = lifecycle(root, "--once", wait=False)
    journal = mount / "mofed-lifecycle/journal.json"
    wait_for(lambda: journal.exists() and '"state": "reload"' in journal.read_text(),
             "the daemon inside openibd restart", timeout=30)
    ballast = fill(mount, reserve_too=reserve_too)
    _, stderr = p.communicate(timeout=120)
    return ballast, p, stderr


@pytest.fixture
def mixed(make_node):
    root, k = make_node(MIXED.replace("openibd_restart_s = 60", "openibd_restart_s = 300"), "mx")
    with small_tmpfs(root / DRIVERS) as mount:
        yield root, k, mount


def test_the_disk_filling_during_the_swap_still_removes_the_blacklist_and_restores_every_vf(mixed):
    root, k, mount = mixed
    before = k.call("state")
    ballast, p, stderr = fill_during_openibd(root, mount, reserve_too=True)
    # openibd was running: every journal write from then on failed
    assert p.returncode == 1, stderr[-3000:]
    after = k.call("state")
    assert after["blacklist_files"] == []
    assert vf_fields(after) == vf_fields(before) and pf_shape(after) == pf_shape(before)
    assert all(m["srcversion"] for m in after["modules"].values())
    assert not after["markers"][MARKER]  # not ready while a restart could not resume
    ev = events(stderr)
    names = [e["event"] for e in ev]
    unsaved = next(e for e in ev if e["event"] == "journal.unsaved")
    assert "No space left on device" in unsaved["error"] and str(mount) in unsaved["error"]
    failed = next(e for e in ev if e["event"] == "step.failed")
    assert failed["state"] == "ready" and "journal cannot be written" in failed["error"]
    assert names.index("blacklist.removed") < names.index("restore.done") < names.index(
        "step.failed")
    # room again: the next start is ready without touching a VF or reloading
    ballast.unlink()
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-3000:]
    again = k.call("state")
    assert vf_fields(again) == vf_fields(before) and again["markers"][MARKER]
    assert "openibd.restart" not in [e["event"] for e in events(r.stderr)]


def test_the_journals_reserve_lets_a_swap_under_way_finish_durably_on_a_full_disk(mixed):
    root, k, mount = mixed
    before = k.call("state")
    _, p, stderr = fill_during_openibd(root, mount, reserve_too=False)
    journal = mount / "mofed-lifecycle/journal.json"
    assert p.returncode == 0, stderr[-3000:]
    after = k.call("state")
    assert after["blacklist_files"] == [] and after["markers"][MARKER]
    assert vf_fields(after) == vf_fields(before)
    released = next(e for e in events(stderr) if e["event"] == "journal.reserve_released")
    assert str(mount) in released["mount"]
    facts = json.loads(journal.read_text())["facts"]  # what a restart resumes from is on disk
    assert facts["restore_pending"] is False and len(facts["restored_vfs"]) == 9
    # no new swap is started on the mount while it is full: a reload needed now (an operator
    # unloaded the driver) fails before anything is touched
    assert not (mount / "mofed-lifecycle/journal.reserve").exists()
    assert sim("set", "--root", str(root), "module-unload", "mlx5_ib").returncode == 0
    r = lifecycle(root, "--once")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert failed["state"] == "snapshot" and "is full" in failed["error"]
    assert k.call("state")["blacklist_files"] == []
    assert "openibd.restart" not in [e["event"] for e in events(r.stderr)]


def test_every_restart_on_a_full_disk_removes_a_blacklist_left_behind_and_restores_the_vfs(mixed):
    root, k, mount = mixed
    before = k.call("state")
    r = lifecycle(root, "--once", env={"MOFED_LIFECYCLE_CRASH_AT": "unblacklist"})
    assert r.returncode == -signal.SIGKILL
    assert k.call("state")["blacklist_files"]  # killed holding it, every VF gone
    fill(mount)
    for _ in range(2):  # and again: nothing depends on a write succeeding
        r = lifecycle(root, "--once")
        assert r.returncode == 1, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        after = k.call("state")
        assert after["blacklist_files"] == []
        assert vf_fields(after) == vf_fields(before)
        failed = [e for e in events(r.stderr) if e["event"] == "step.failed"]
        assert failed and "No space left on device" in failed[-1]["error"]


def test_a_disk_full_before_the_swap_touches_nothing(mixed):
    root, k, mount = mixed
    before = k.call("state")
    fill(mount)
    r = lifecycle(root, "--once")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    after = k.call("state")
    assert after["modules"] == before["modules"] and vf_fields(after) == vf_fields(before)
    assert after["blacklist_files"] == []
    failed = next(e for e in events(r.stderr) if e["event"] == "step.failed")
    assert failed["state"] == "snapshot" and str(mount) in failed["error"]
