"""SIGTERM never deadlocks the daemon: the handler only records the signal (signals.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

# The signal arrives while the main thread is in the middle of writing a log line (it holds
# structlog's write lock for stderr): the old handler logged too, blocked on that lock and hung.
PROGRAM = r"""
import os, signal, sys, threading, time
import structlog._output as out
from mofed_lifecycle.log import configure_logging, get_logger
from mofed_lifecycle.signals import StopSignals

configure_logging(json=True)
log = get_logger("test")
stopped = threading.Event()

def request_stop(signum, _frame=None):
    log.info("signal.received", signal=signal.Signals(signum).name)
    stopped.set()

StopSignals(request_stop).install()
with out._get_lock_for_file(sys.stderr):  # the main thread is writing a log line
    os.kill(os.getpid(), signal.SIGTERM)   # the handler runs here, inside the lock
    time.sleep(0.2)
print("handler returned", flush=True)
print("stop seen" if stopped.wait(10) else "stop lost", flush=True)
"""


def test_a_sigterm_during_a_log_line_is_handled_without_deadlock():
    r = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.splitlines() == ["handler returned", "stop seen"], r.stdout + r.stderr
    assert '"event": "signal.received"' in r.stderr and '"signal": "SIGTERM"' in r.stderr


def test_the_daemon_and_the_loader_install_the_recording_handler(monkeypatch):
    from mofed_lifecycle.lifecycle.runner import install_signal_handlers as daemon
    from mofed_lifecycle.peermem.loader import install_signal_handlers as loader
    from mofed_lifecycle.signals import StopSignals

    seen: list[int] = []

    class Stub:
        def request_stop(self, signum, _frame=None):
            seen.append(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for install in (daemon, loader):
            handlers = install(Stub())
            assert isinstance(handlers, StopSignals)
            assert signal.getsignal(signal.SIGTERM) == handlers.handler
            assert signal.getsignal(signal.SIGINT) == handlers.handler
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
