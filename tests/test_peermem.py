"""The peermem loader: pure decisions, then the real `mofed-lifecycle peermem` on simulated nodes.

Subprocess tests run the loader and the lifecycle as real commands and judge by the simulated
kernel's ground truth (modules, its timeline, its `peermem` facts), never by what the loader says;
the loader's log is read only to know *when* it has reached a state (waits poll files under a
deadline, as in test_lifecycle.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mofed_lifecycle.config import load_config
from mofed_lifecycle.host.inotify import FileWatcher
from mofed_lifecycle.peermem.checks import (
    Facts,
    Kind,
    KoFacts,
    Marker,
    classify_failure,
    evaluate,
    fingerprint,
    parse_kallsyms,
    parse_modversions,
    parse_symvers,
)
from mofed_lifecycle.peermem.presence import LoaderPresence, loader_watching
from mofed_lifecycle.sim.peermem_ko import ko_text, peer_crc, symvers_rel
from mofed_lifecycle.sim.run import run_scenario
from mofed_lifecycle.sim.scenario_parse import parse_scenario

from .conftest import SHARED_SCENARIOS
from .test_lifecycle import MARKER, events, jsonl, kernel_events, lifecycle, wait_for

FAST = {"PEERMEM_DEBOUNCE_SEC": "0.01", "PEERMEM_RECHECK_SEC": "0.2"}
RACE = SHARED_SCENARIOS / "kernel-upgrade-peermem-race.toml"
KO = "lib/modules/5.15.0-generic/updates/nvidia_peermem.ko"

NODE = """
[node]
name = "pm"
time_scale = 0.01
seed = 3
[driver]
loaded_version = "{loaded}"
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
peermem_ko = "{ko}"
peermem_loaded = {pm_loaded}
peermem_users = {users}
"""


def node_text(*, loaded: str = "24.10-1.1.4", ko: str = "matching", pm_loaded: bool = False,
              users: int = 0) -> str:
    return NODE.format(loaded=loaded, ko=ko, pm_loaded=str(pm_loaded).lower(), users=users)


class Loader:
    """`mofed-lifecycle peermem` running in the background, its log in a file."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        n = len(list((root / ".sim").glob("peermem-test-*.log")))
        self.log = root / ".sim" / f"peermem-test-{n}.log"
        argv = [sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json", "peermem",
                "--root", str(root), *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env={**os.environ, **FAST, **(env or {})},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def events(self) -> list[dict]:
        return [e for e in jsonl(self.log) if e.get("component") == "peermem"]

    def wait_event(self, name: str, timeout: float = 30.0, **match: object) -> dict:
        def found() -> dict | None:
            return next((e for e in self.events() if e["event"] == name
                         and all(e.get(k) == v for k, v in match.items())), None)
        wait_for(lambda: found() is not None or self.proc.poll() is not None,
                 f"{name} {match} in {self.log}", timeout)
        event = found()
        assert event is not None, self.log.read_text()[-3000:]
        return event

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


@pytest.fixture
def loaders():
    started: list[Loader] = []

    def start(root: Path, *args: str, env: dict[str, str] | None = None) -> Loader:
        started.append(Loader(root, *args, env=env))
        return started[-1]

    yield start
    for loader in started:
        loader.stop()


def peermem_loaded(k) -> bool:
    return "nvidia_peermem" in k.call("state")["modules"]


def write_marker(root: Path, doc: dict, mtime_ns: int | None = None) -> None:
    path = root / MARKER
    tmp = path.with_name(".test-marker.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


def replace_ko(root: Path, text: str) -> None:
    tmp = root / (KO + ".new")
    tmp.write_text(text)
    os.replace(tmp, root / KO)


# ---- pure: pre-checks and failure classes -------------------------------------------------------

SV = {"mlx5_core": "A1", "mlx5_ib": "B2", "ib_core": "C3", "ib_uverbs": "D4"}
SYMS = {"ib_register_peer_memory_client": "ib_uverbs",
        "ib_unregister_peer_memory_client": "ib_uverbs"}
CRCS = {"ib_register_peer_memory_client": "0x0000abcd",
        "ib_unregister_peer_memory_client": "0x0000beef"}
GOOD = Facts(marker=Marker(2000, 7, {"mlx5_core": "A1", "mlx5_ib": "B2", "ib_core": "C3"}),
             srcversions=SV, srcversions_later=SV, exporters=SYMS, kernel_release="6.8.0-45",
             ko=KoFacts("/lib/modules/6.8.0-45/nvidia-peermem.ko", "6.8.0-45 SMP mod_unload",
                        {**CRCS, "module_layout": "0x1"}),
             symvers=CRCS, symvers_path="/run/mellanox/drivers/usr/src/ofa_kernel/x/Module.symvers")


def with_(**changes: object) -> Facts:
    from dataclasses import replace
    return replace(GOOD, **changes)


@pytest.mark.parametrize(("facts", "kind", "code", "words"), [
    (GOOD, Kind.LOAD, "load", "ib_uverbs"),
    (with_(marker=None), Kind.WAIT, "marker-absent", "marker is absent"),
    (with_(blacklist="/host/etc/modprobe.d/b.conf"), Kind.WAIT, "blacklist", "b.conf"),
    (with_(srcversions={**SV, "ib_uverbs": None}), Kind.WAIT, "module-missing", "ib_uverbs"),
    (with_(srcversions={**SV, "ib_core": "OLD"}, srcversions_later={**SV, "ib_core": "OLD"}),
     Kind.WAIT, "srcversion-mismatch", "ib_core OLD ≠ marker C3"),
    (with_(srcversions_later={**SV, "mlx5_ib": "NEW"}), Kind.WAIT, "unstable", "mlx5_ib"),
    (with_(exporters={}), Kind.WAIT, "symbols-absent", "inbox"),
    (with_(ko=KoFacts(None, error="Module nvidia-peermem not found.")), Kind.WAIT, "ko-missing",
     "not found"),
    (with_(ko=KoFacts("/x.ko", "6.5.0-1 SMP", CRCS)), Kind.REBUILD, "vermagic", "6.5.0-1"),
    (with_(ko=KoFacts("/x.ko", "6.8.0-45 SMP", {"module_layout": "0x1"})), Kind.REBUILD, "stub",
     "stub"),
    (with_(symvers={**CRCS, "ib_register_peer_memory_client": "0x00001111"}), Kind.REBUILD,
     "crc-mismatch", "0x0000abcd ≠ 0x00001111"),
    (with_(symvers=None), Kind.LOAD, "load", "no Module.symvers"),
    (with_(peermem_loaded=True, ko=None), Kind.VERIFIED, "verified", "ib_uverbs"),
    (with_(marker=Marker(1000, 7, GOOD.marker.srcversions), loaded_against=(1000, 7)), Kind.WAIT,
     "marker-not-newer", "reload is under way"),
    (with_(marker=Marker(1000, 7, GOOD.marker.srcversions), loaded_against=(1000, 7),
           peermem_loaded=True), Kind.VERIFIED, "verified", ""),
    (with_(gpu_required=True, gpu_marker=True), Kind.WAIT, "gpu-not-ready", "nvidia module"),
    (with_(gpu_required=True, gpu_marker=True, nvidia_loaded=True), Kind.LOAD, "load", ""),
    (with_(marker=Marker(1, 1, None)), Kind.LOAD, "load", ""),  # a legacy, empty marker
])
def test_pre_checks_decide_in_order(facts: Facts, kind: Kind, code: str, words: str):
    v = evaluate(facts)
    assert (v.kind, v.code) == (kind, code), v
    assert words in v.reason
    if kind is Kind.REBUILD:
        assert v.status == "rebuild-needed" and "rebuild nvidia-peermem" in v.next


@pytest.mark.parametrize(("stderr", "timed_out", "kind", "code"), [
    ("modprobe: ERROR: could not insert 'nvidia_peermem': Unknown symbol in module, or unknown "
     "parameter (see dmesg)", False, Kind.WAIT, "enoent"),
    ("modprobe: ERROR: could not insert 'nvidia_peermem': Invalid argument", False, Kind.REBUILD,
     "einval"),
    ("nvidia_peermem: disagrees about version of symbol ib_register_peer_memory_client", False,
     Kind.REBUILD, "einval"),
    ("modprobe: ERROR: could not insert 'nvidia_peermem': Exec format error", False, Kind.REBUILD,
     "enoexec"),
    ("modprobe: FATAL: Module nvidia-peermem not found in directory /lib/modules/6.8", False,
     Kind.WAIT, "ko-missing"),
    ("", True, Kind.WAIT, "timeout"),
    ("modprobe: ERROR: could not insert 'nvidia_peermem': Operation not permitted", False,
     Kind.ERROR, "modprobe-failed"),
])
def test_a_failed_modprobe_is_classified_not_blindly_retried(stderr, timed_out, kind, code):
    v = classify_failure(1, stderr, timed_out=timed_out, timeout_s=60)
    assert (v.kind, v.code) == (kind, code)
    # the kernel's definitive answers are retried only once an input changed; the rest back off
    assert v.definitive == (code in ("enoent", "einval", "enoexec", "ko-missing"))


def test_fingerprint_changes_with_what_a_load_depends_on():
    assert fingerprint(GOOD) == fingerprint(with_(srcversions_later={}))
    for other in (with_(marker=Marker(3000, 8, {})), with_(srcversions={**SV, "ib_core": "X"}),
                  with_(exporters={}), with_(ko=KoFacts("/x.ko", "6.8.0-45 SMP", {}))):
        assert fingerprint(other) != fingerprint(GOOD)


def test_parsers_find_the_exporter_and_the_crcs():
    kallsyms = ("ffffffff81000000 T _stext\n"
                "ffffffffc0b20000 T ib_register_peer_memory_client_x\t[foo]\n"
                "ffffffffc0b20000 T ib_register_peer_memory_client\t[ib_core]\n"
                "0000000000000000 T ib_unregister_peer_memory_client\n")
    assert parse_kallsyms(kallsyms) == {"ib_register_peer_memory_client": "ib_core",
                                        "ib_unregister_peer_memory_client": "vmlinux"}
    assert parse_kallsyms("ffffffff81000000 T printk\n") == {}
    assert parse_modversions("0x1ad1184d\tib_register_peer_memory_client\n0x3\tfoo\n") == {
        "ib_register_peer_memory_client": "0x1ad1184d", "foo": "0x00000003"}
    assert parse_symvers("0xab\tib_register_peer_memory_client\tdrivers/x/ib_uverbs\tEXPORT_SYMBOL"
                         "\t\n0x1\tother\tm\tEXPORT_SYMBOL\n") == {
        "ib_register_peer_memory_client": "0x000000ab"}


def test_a_marker_is_newer_only_if_written_later():
    m = Marker(5000, 3, {})
    assert m.newer_than(None) and m.newer_than((4999, 3))
    assert not m.newer_than((5000, 9)) and not m.newer_than((6000, 3))


def test_inotify_sees_a_file_appear_under_a_directory_that_does_not_exist_yet(tmp_path: Path):
    target = tmp_path / "run" / "mellanox" / "drivers" / ".driver-ready"
    w = FileWatcher([target])
    try:
        assert w.wait(0.05) is False
        target.parent.mkdir(parents=True)
        assert w.wait(5) is True  # a directory on the way appeared
        (target.parent / "unrelated").write_text("x")
        assert w.wait(0.1) is False  # not about the watched file
        target.write_text("{}")
        assert w.wait(5) is True
        w.wake()
        assert w.wait(5) is True
    finally:
        w.close()


def test_the_presence_lock_says_whether_a_loader_watches(tmp_path: Path):
    lock = tmp_path / ".peermem-loader.lock"
    assert not loader_watching(lock)
    held = LoaderPresence(lock)
    assert held.acquire() and loader_watching(lock)
    held.release()
    assert not loader_watching(lock)


def test_new_config_variables_have_their_defaults():
    c = load_config({}, require_driver_version=False)
    assert (c.peermem_unload_wait_s, c.peermem_wait_gpu_driver, c.peermem_module_params) == (
        30.0, False, ())
    assert c.gpu_driver_ready_path == "/run/nvidia/validations/.driver-ctr-ready"


# ---- sim run: the race --------------------------------------------------------------------------


@pytest.mark.parametrize("start_s", [None, 0.0, 100.0, 400.0])
def test_kernel_upgrade_race_loads_peermem_once_after_the_marker(tmp_path: Path, start_s):
    """The shared race scenario as is (None), and with the loader started before, during and
    after the 151 s reload."""
    scenario = RACE
    if start_s is not None:
        scenario = tmp_path / "race.toml"
        scenario.write_text(RACE.read_text().replace("peermem_start_s = 20.0",
                                                     f"peermem_start_s = {start_s}"))
    run = run_scenario(scenario)
    r = run.report
    assert r["outcome"] == "ready", run.log_tail
    pm = r["peermem"]
    assert pm["status"] == "loaded" and pm["loaded"] and pm["loads"] == 1, pm
    assert pm["failed_attempts"] == 0 and pm["failed_before_marker"] == 0, pm
    assert not pm["loader"]["exited_by_itself"], pm
    assert pm["marker_to_load_s"] is not None and pm["marker_to_load_s"] < 5, pm
    assert pm["marks"]["loaded_s"][0] >= pm["marks"]["marker_appeared_s"][0]
    assert r["state_after"]["modules"]["nvidia_peermem"]["srcversion"].startswith("PEERMEM")


# ---- the loader on simulated nodes --------------------------------------------------------------


@pytest.mark.parametrize(("ko", "code", "words"), [
    ("stub", "stub", "imports no peer-memory symbol"),
    ("stale", "crc-mismatch", "built against another NIC driver build"),
])
def test_a_bad_build_is_rebuild_needed_loudly_and_a_new_build_is_loaded(make_node, loaders, ko,
                                                                        code, words):
    text = node_text(ko=ko)
    root, k = make_node(text)
    assert lifecycle(root, "--once").returncode == 0  # the NIC upgrade: marker set
    once = subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json",
                           "peermem", "--root", str(root), "--once", "--timeout", "1"],
                          env={**os.environ, **FAST}, capture_output=True, text=True, timeout=60)
    assert once.returncode == 1
    assert words in once.stderr.splitlines()[-1] and "rebuild" in once.stderr.splitlines()[-1]
    watching = loaders(root)
    e = watching.wait_event("peermem.rebuild_needed", code=code)
    assert e["level"] == "error" and "restart the GPU driver pod" in e["next"]
    assert watching.proc.poll() is None  # it keeps running: no crash-loop
    assert "peermem.load_failed" not in kernel_events(root)  # the pre-check caught it
    assert not peermem_loaded(k)
    replace_ko(root, ko_text(parse_scenario(text), "matching"))  # the GPU side rebuilt it
    wait_for(lambda: peermem_loaded(k), "nvidia_peermem loaded from the new build")
    assert k.call("peermem")["loads"] == 1 and watching.proc.poll() is None
    assert watching.stop() == 0


def test_einval_from_modprobe_is_not_retried_until_something_changes(make_node, loaders):
    root, k = make_node(node_text(ko="stale"))
    assert lifecycle(root, "--once").returncode == 0
    (root / symvers_rel(parse_scenario(node_text()))).unlink()  # the CRC pre-check cannot see it
    loader = loaders(root)
    e = loader.wait_event("peermem.rebuild_needed", code="einval")
    assert "EINVAL" in e["reason"]
    assert kernel_events(root).count("peermem.load_failed") == 1
    blacklist = root / "etc/modprobe.d/blacklist-ofed-modules.conf"
    blacklist.write_text("blacklist mlx5_core\n")  # the loader looks again...
    loader.wait_event("peermem.waiting", code="blacklist")
    blacklist.unlink()
    wait_for(lambda: sum(e["event"] == "peermem.rebuild_needed" for e in loader.events()) == 2,
             "the second rebuild_needed")
    assert kernel_events(root).count("peermem.load_failed") == 1  # ...but does not retry blindly
    assert loader.proc.poll() is None


def test_an_already_loaded_peermem_is_verified_not_reloaded(make_node):
    root, k = make_node(node_text(loaded="25.07-0.9.7", pm_loaded=True))
    r = lifecycle(root, "--once")  # the driver matches: no reload, marker set
    assert r.returncode == 0 and "openibd.loaded" not in kernel_events(root)
    once = subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json",
                           "peermem", "--root", str(root), "--once", "--timeout", "30"],
                          env={**os.environ, **FAST}, capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr[-2000:]
    assert any(e["event"] == "peermem.verified" for e in events(once.stderr))
    assert not any(e["event"] == "command.finished" and e["argv"][:2] == ["modprobe",
                                                                         "nvidia-peermem"]
                   for e in events(once.stderr))
    assert peermem_loaded(k) and k.call("peermem")["loads"] == 0
    assert not [e for e in jsonl(root / ".sim/timeline.jsonl")
                if e.get("module") == "nvidia_peermem"]


def test_a_nic_upgrade_with_a_watching_loader_unloads_then_loads_against_the_new_stack(
        make_node, loaders):
    text = node_text(pm_loaded=True)
    root, k = make_node(text)
    sc = parse_scenario(text)
    old = {m: sc.host_srcversion(m) for m in ("mlx5_core", "mlx5_ib", "ib_core")}
    write_marker(root, {"driver_version": "24.10-1.1.4", "srcversions": old})  # a previous run's
    loader = loaders(root)
    loader.wait_event("peermem.verified")  # loaded by someone else, against the live stack
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    wait_for(lambda: peermem_loaded(k), "nvidia_peermem loaded again")
    tl = jsonl(root / ".sim/timeline.jsonl")
    order = [(e["event"], e.get("module")) for e in tl
             if e.get("module") == "nvidia_peermem" or e["event"].startswith("openibd.")]
    assert order == [("module.unloaded", "nvidia_peermem"), ("openibd.unloaded", None),
                     ("openibd.loaded", None), ("module.loaded", "nvidia_peermem")]
    assert any(e["event"] == "peermem.unloaded" for e in loader.events())
    st = k.call("state")["modules"]
    assert "nvidia_peermem" in st["ib_uverbs"]["holders"]  # 25.07 exports it from ib_uverbs
    assert st["ib_core"]["srcversion"] == sc.installed_srcversion("ib_core")
    assert k.call("peermem")["loads"] == 1
    # Marker removed again: unloaded. Put back as it was (same time): not newer, not loaded.
    marker = root / MARKER
    doc, mtime = json.loads(marker.read_text()), marker.stat().st_mtime_ns
    marker.unlink()
    wait_for(lambda: not peermem_loaded(k), "nvidia_peermem unloaded when the marker vanished")
    write_marker(root, doc, mtime_ns=mtime)
    loader.wait_event("peermem.waiting", code="marker-not-newer")
    assert not peermem_loaded(k)
    write_marker(root, doc, mtime_ns=mtime + 1_000_000_000)  # a newer marker
    wait_for(lambda: peermem_loaded(k), "loaded against the newer marker")
    assert k.call("peermem")["loads"] == 2 and loader.proc.poll() is None


def test_peermem_in_use_refuses_the_reload_and_leaves_the_node_untouched(make_node, loaders):
    root, k = make_node(node_text(pm_loaded=True, users=2))
    before = k.call("state")
    r = lifecycle(root, "--once", env={"PEERMEM_UNLOAD_WAIT_SEC": "30"})  # no loader watching
    assert r.returncode == 1
    assert any(e["event"] == "peermem.no_loader" for e in events(r.stderr))
    loader = loaders(root)
    loader.wait_event("peermem.waiting", code="in-use")
    r = lifecycle(root, "--once", env={"PEERMEM_UNLOAD_WAIT_SEC": "30"}, timeout=20)
    assert r.returncode == 1  # promptly: the loader never unloads a module in use
    assert any(e["event"] == "peermem.in_use" for e in events(r.stderr))
    refused = next(e for e in events(r.stderr) if e["event"] == "reload.refused")
    assert refused["reason"].startswith("nvidia_peermem holds ib_core") and "in use" in \
        refused["reason"]
    after = k.call("state")
    assert after["modules"] == before["modules"] and after["blacklist_files"] == []
    assert after["pfs"] == before["pfs"]
    assert "openibd.unloaded" not in kernel_events(root) and loader.proc.poll() is None


def test_a_marker_with_stale_srcversions_waits_until_a_true_one(make_node, loaders):
    text = node_text(loaded="25.07-0.9.7")
    root, k = make_node(text)
    sc = parse_scenario(text)
    stale = {m: sc.installed_srcversion(m) for m in ("mlx5_core", "mlx5_ib")}
    write_marker(root, {"srcversions": {**stale, "ib_core": "0123456789ABCDEF0123456"}})
    loader = loaders(root)
    e = loader.wait_event("peermem.waiting", code="srcversion-mismatch")
    assert "ib_core" in e["reason"] and not peermem_loaded(k)
    assert lifecycle(root, "--once").returncode == 0  # the NIC side writes a true marker
    wait_for(lambda: peermem_loaded(k), "nvidia_peermem loaded once the marker is true")
    assert k.call("peermem")["loads"] == 1 and kernel_events(root).count(
        "peermem.load_failed") == 0


def test_a_modprobe_hanging_past_its_timeout_is_killed_and_retried(make_node, loaders):
    root, k = make_node(node_text(loaded="25.07-0.9.7"))
    assert lifecycle(root, "--once").returncode == 0
    modprobe = root / ".sim/bin/modprobe"
    real = modprobe.with_name("modprobe.real")
    os.replace(modprobe, real)
    modprobe.write_text(f'#!/bin/sh\n[ "$*" = "nvidia-peermem" ] && exec sleep 60\n'
                        f'exec "{real}" "$@"\n')
    modprobe.chmod(modprobe.stat().st_mode | stat.S_IXUSR)
    loader = loaders(root, env={"PEERMEM_MODPROBE_TIMEOUT_SEC": "0.5"})
    e = loader.wait_event("peermem.load_failed", code="timeout")
    assert "did not finish within 0.5s" in e["reason"] and not peermem_loaded(k)
    os.replace(real, modprobe)  # the module finished initialising: the next attempt works
    wait_for(lambda: peermem_loaded(k), "loaded on a later attempt")
    assert loader.proc.poll() is None and k.call("peermem")["loads"] == 1
    assert peer_crc("25.07-0.9.7", "ib_register_peer_memory_client").startswith("0x")
