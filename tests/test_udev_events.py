"""udev events of the simulated node reach the daemon's real pyudev code path.

A listener process runs `host.udev.PyudevNetdevEvents` (pyudev -> libudev) under umockdev's preload
library, which turns libudev's netlink socket into one the simulator sends to. The fallback for
machines without umockdev (events streamed by the kernel process) is checked the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mofed_lifecycle.host.udev import event_from_properties
from mofed_lifecycle.sim.udev import SimNetdevEvents
from mofed_lifecycle.sim.uevent import decode, encode, murmur2_32, umockdev_env

PF = "0000:08:00.0"

LISTENER = textwrap.dedent("""
    import json, sys
    from mofed_lifecycle.host.udev import PyudevNetdevEvents, umockdev_active_for
    assert umockdev_active_for(sys.argv[1]), "not running under umockdev"
    events = PyudevNetdevEvents()
    print("ready", flush=True)
    renamed = 0
    while renamed < int(sys.argv[2]):
        ev = events.poll(timeout=20)
        if ev is None:
            print("timeout", flush=True)
            break
        print(json.dumps(ev.__dict__), flush=True)
        renamed += ev.action == "move"
""")


def recreate_vfs(k, n: int) -> None:
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value="0")
    k.call("sysfs_write", path=f"sys/bus/pci/devices/{PF}/sriov_numvfs", value=str(n))


def test_pyudev_receives_add_and_move_for_every_vf_with_final_names(tiny):
    root, k = tiny
    env = umockdev_env(root)
    if env is None:
        why = ("umockdev is not installed (apt-get install umockdev): the pyudev path cannot be "
               "fed simulated events on this machine")
        if os.environ.get("MOFED_REQUIRE_UMOCKDEV"):
            pytest.fail(why + " -- and MOFED_REQUIRE_UMOCKDEV is set (CI must run this test)")
        pytest.skip(why)
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(root), "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        recreate_vfs(k, 4)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "timeout" not in out, err
    adds = {e["pci"]: e for e in events if e["action"] == "add"}
    moves = {e["pci"]: e for e in events if e["action"] == "move"}
    expected = {f"0000:08:00.{2 + i}": f"enp8s0f0v{i}" for i in range(4)}
    # udev's add comes once naming is done: it already carries the final name...
    assert {pci: e["name"] for pci, e in adds.items()} == expected
    # ...and the rename from the kernel's ethN is reported too, keyed by PCI address.
    assert {pci: e["name"] for pci, e in moves.items()} == expected
    assert all(e["old_name"].startswith("eth") for e in moves.values())
    assert all(isinstance(e["ifindex"], int) for e in events)


def test_fallback_stream_delivers_the_same_events_without_umockdev(tiny):
    root, k = tiny
    events = SimNetdevEvents(root)
    try:
        recreate_vfs(k, 4)
        got = []
        while len([e for e in got if e.action == "move"]) < 4:
            ev = events.poll(timeout=30)
            assert ev is not None, f"no event within 30 s; got {got}"
            got.append(ev)
    finally:
        events.close()
    removed = {e.pci for e in got if e.action == "remove"}
    assert removed == {f"0000:08:00.{2 + i}" for i in (0, 1, 3)}  # VF 2 was on vfio-pci: no netdev
    names = {e.pci: e.name for e in got if e.action == "add"}
    assert names == {f"0000:08:00.{2 + i}": f"enp8s0f0v{i}" for i in range(4)}


def test_libudev_message_format_round_trips():
    props = {"ACTION": "add", "DEVPATH": "/devices/pci0000:00/0000:01:00.2/net/eth0",
             "SUBSYSTEM": "net", "SEQNUM": "7", "INTERFACE": "eth0", "IFINDEX": "5"}
    msg = encode(props)
    assert msg.startswith(b"libudev\0")
    assert decode(msg) == props
    assert murmur2_32(b"") == 0 and murmur2_32(b"net") != murmur2_32(b"pci")
    ev = event_from_properties(props)
    assert (ev.action, ev.name, ev.pci, ev.ifindex) == ("add", "eth0", "0000:01:00.2", 5)
    assert event_from_properties({**props, "SUBSYSTEM": "pci"}) is None


def test_a_stream_of_unrelated_netdev_events_never_holds_the_readiness_wait_past_its_deadline():
    """Events for other netdevs (veth churn on a busy node) keep coming: `poll` still returns at
    its deadline, so the restore's own deadline and stop are checked (scaled clock, no sleeps)."""
    from mofed_lifecycle.host.udev import NetdevEvent
    from mofed_lifecycle.sriov.readiness import Readiness

    now = [0.0]

    class Churn:
        def poll(self, timeout):  # an unrelated event at once, every time; time moves 10 ms
            now[0] += 0.01
            return NetdevEvent("add", "veth0", None, 99, None)

        def close(self):
            pass

    r = Readiness(Churn(), present=lambda pci: None, driver=lambda pci: "mlx5_core",
                  clock=lambda: now[0])
    r.expect("0000:08:00.2", None, "mlx5_core", check_now=False)
    assert r.poll(1.0) == [] and 1.0 <= now[0] < 1.1  # returned at its deadline
