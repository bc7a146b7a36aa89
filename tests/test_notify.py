"""sd_notify on a real datagram socket: the messages systemd would receive from `run`.

The test binds the socket systemd would (an abstract `@name`, and a filesystem path), runs the
daemon with NOTIFY_SOCKET pointing at it, and records every datagram together with whether the
readiness marker existed when it arrived.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import uuid
from pathlib import Path

from mofed_lifecycle.config import load_config
from mofed_lifecycle.heartbeat import Heartbeat, read_heartbeat
from mofed_lifecycle.lifecycle.budget import state_budget_s
from mofed_lifecycle.notify import Notifier, socket_address, watchdog_interval_s

from .test_lifecycle import MARKER, journal_states, lifecycle, wait_for


class Receiver:
    """A NOTIFY_SOCKET: records (assignments, marker existed) for each datagram, on a thread."""

    def __init__(self, address: str, marker: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.05)
        self.marker = marker
        self.messages: list[tuple[list[str], bool]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            seen = bool(self.marker and self.marker.exists())
            self.messages.append((data.decode().split("\n"), seen))

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()

    def values(self, key: str) -> list[str]:
        return [a.split("=", 1)[1] for m, _ in self.messages for a in m if a.startswith(key + "=")]


def test_socket_addresses_and_watchdog_interval():
    assert socket_address("@sd/notify") == "\0sd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("") is None and socket_address("vsock:2:1") is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "2"}, pid=2) == 30.0
    assert watchdog_interval_s({}) is None and watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None


def test_without_notify_socket_every_call_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and not n.status("x") and not n.ready("x") and not n.watchdog()


def test_messages_reach_a_filesystem_socket_and_ready_is_sent_once():
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # short: sun_path holds 108 bytes
        path = os.path.join(d, "notify")
        rx = Receiver(path)
        try:
            n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
            assert n.status("inspect: reading") and n.ready("serve") and n.ready("serve again")
            assert n.watchdog() and n.stopping("stopping")
            wait_for(lambda: len(rx.messages) == 5, "five datagrams", timeout=5)
        finally:
            rx.close()
    assert [m for m, _ in rx.messages] == [
        ["STATUS=inspect: reading"], ["READY=1", "STATUS=serve"], ["STATUS=serve again"],
        ["WATCHDOG=1"], ["STOPPING=1", "STATUS=stopping"]]


def test_a_missing_socket_never_fails_the_caller():
    n = Notifier({"NOTIFY_SOCKET": f"@mofed-test-absent-{uuid.uuid4().hex}"})
    assert n.enabled and n.status("x") is False


def test_a_step_past_its_budget_stops_the_watchdog_and_says_overdue(tmp_path):
    config = load_config({}, require_driver_version=False)
    address = f"@mofed-test-{uuid.uuid4().hex}"
    rx = Receiver(address)
    try:
        n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        now = 10_000.0
        state = ["reload", now - 5.0]
        hb = Heartbeat(tmp_path, 10.0, n, lambda: (state[0], state[1]),
                       lambda s: state_budget_s(s, config), clock=lambda: now)
        assert hb.period == 1.0  # half the watchdog interval, shorter than the heartbeat's
        assert hb.beat()["overdue"] is False
        state[1] = now - 100_000.0  # in reload for longer than every openibd attempt could take
        assert hb.beat()["overdue"] is True and read_heartbeat(tmp_path)["overdue"] is True
        state[0] = "serve"  # an event wait has no budget
        assert hb.beat()["overdue"] is False
        wait_for(lambda: len(rx.messages) == 2, "two watchdog pings", timeout=5)
    finally:
        rx.close()
    assert rx.values("WATCHDOG") == ["1", "1"]  # none for the overdue beat


def test_run_under_a_notify_socket_reports_each_state_and_ready_only_after_the_marker(tiny):
    root, _k = tiny
    address = f"@mofed-test-{uuid.uuid4().hex}"
    rx = Receiver(address, marker=root / MARKER)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "HEARTBEAT_INTERVAL_SEC": "5"}
    proc = lifecycle(root, env=env, wait=False)
    try:
        wait_for(lambda: "1" in rx.values("READY"), "READY=1")
        pings = len(rx.values("WATCHDOG"))
        wait_for(lambda: len(rx.values("WATCHDOG")) > pings, "a watchdog ping while serving")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        wait_for(lambda: any(s.startswith("stopped") for s in rx.values("STATUS")), "stopped")
    finally:
        proc.kill()
        rx.close()
    assert proc.returncode == 0, err[-2000:]

    statuses = [s.split(":")[0] for s in rx.values("STATUS")]
    states = journal_states(root)
    assert [s for s in statuses if s != "stopping"] == [s for s in states if s != "stopping"]
    assert states.index("serve") < states.index("stopping")
    ready = [(m, seen) for m, seen in rx.messages if "READY=1" in m]
    assert len(ready) == 1 and ready[0][1] is True  # once, and the marker was already there
    assert ready[0][0] == ["READY=1", "STATUS=serve: driver 25.07-0.9.7 ready, marker set"]
    before_ready = rx.messages[:rx.messages.index(ready[0])]
    assert all(m != ["READY=1"] for m, _ in before_ready)
    assert "1" in rx.values("STOPPING") and len(rx.values("WATCHDOG")) >= 2
    beat = read_heartbeat(root / "run/mellanox/drivers/mofed-lifecycle")
    assert beat["running"] is False and beat["state"] == "stopped"
