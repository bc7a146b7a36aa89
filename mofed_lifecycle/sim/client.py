"""Talks to a simulated node's kernel process, starting it when none runs.

Standard library only: the stand-in tools (modprobe, openibd...) import this on every call.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SimKernelError

START_TIMEOUT_S = 60.0  # a node with a thousand VFs re-renders its tree at start
PKG_PARENT = str(Path(__file__).resolve().parents[2])


class NotASimulatedNode(RuntimeError):
    pass


def is_simulated(root: Path) -> bool:
    return (Path(root) / ".sim" / "scenario.toml").is_file()


SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address for the Unix socket at `path` that fits sun_path however deep the node's root
    is (a pytest or TMPDIR root easily passes 108 bytes): the path itself when it fits, else the
    same file reached through an open descriptor of its directory (/proc/self/fd/N/NAME)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def clean_env() -> dict[str, str]:
    """The environment for the kernel process: no umockdev preload, the package importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_PARENT, env.get("PYTHONPATH", "")) if p)
    return env


def start_kernel(root: Path) -> subprocess.Popen[bytes]:
    simdir = root / ".sim"
    log = open(simdir / "kernel.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(  # noqa: S603 - fixed argument list
        # -S: the standard library and this package (PYTHONPATH) only, no site start-up cost
        [sys.executable, "-S", "-m", "mofed_lifecycle.sim.server", "--root", str(root)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        env=clean_env(), cwd=str(root),
    )
    log.close()
    return proc


def _last_line(log: Path) -> str:
    try:
        return (log.read_text(errors="replace").splitlines() or ["(no output)"])[-1]
    except OSError as e:
        return f"(cannot read {log}: {e.strerror})"


class KernelClient:
    """One connection to a node's kernel process; safe to share between threads."""

    def __init__(self, root: str | Path, *, autostart: bool = True) -> None:
        self.root = Path(root).resolve()
        if not is_simulated(self.root):
            raise NotASimulatedNode(f"{self.root} is not a simulated node (run `mofed-lifecycle "
                                    "sim init SCENARIO --root DIR` first)")
        self.lock = threading.Lock()
        self.sock = self._connect(autostart)
        self.rfile = self.sock.makefile("rb")

    def _connect(self, autostart: bool) -> socket.socket:
        path = self.root / ".sim" / "kernel.sock"
        deadline = time.monotonic() + START_TIMEOUT_S
        started: subprocess.Popen[bytes] | None = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with socket_address(path) as address:
                    s.connect(address)
                return s
            except OSError:
                s.close()
                if not autostart:
                    raise
                # (Re)start it; one that exits at once with 0 lost the lock to a predecessor
                # still shutting down: try again once that one is gone. One that failed says why.
                if started is not None and started.poll():
                    raise RuntimeError(
                        f"the simulated kernel of {self.root} exited {started.returncode} at "
                        f"start: {_last_line(self.root / '.sim' / 'kernel.log')}") from None
                if started is None or started.poll() is not None:
                    started = start_kernel(self.root)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the simulated kernel of {self.root} did not start within "
                        f"{START_TIMEOUT_S:.0f}s: see {self.root}/.sim/kernel.log") from None
                time.sleep(0.01)  # sleep-ok: waiting for the kernel process's socket, bounded

    def call(self, op: str, **args: Any) -> Any:
        """One request; if the kernel process died under us, reconnect (restarting it) once."""
        request = json.dumps({"op": op, "args": args}).encode() + b"\n"
        with self.lock:
            for attempt in (1, 2):
                try:
                    self.sock.sendall(request)
                    line = self.rfile.readline()
                except OSError:
                    line = b""
                if line or attempt == 2:
                    break
                self.close()
                self.sock = self._connect(autostart=True)
                self.rfile = self.sock.makefile("rb")
        if not line:
            raise ConnectionError(f"the simulated kernel of {self.root} went away: see "
                                  f"{self.root}/.sim/kernel.log")
        reply = json.loads(line)
        if not reply["ok"]:
            raise SimKernelError(reply["errno"], reply["error"])
        return reply["result"]

    def subscribe(self) -> Iterator[dict[str, str]]:
        """udev events from now on (subscribed when this returns; the connection is given over)."""
        self.call("subscribe")
        return self._stream()

    def _stream(self) -> Iterator[dict[str, str]]:
        while line := self.rfile.readline():
            yield json.loads(line)

    def close(self) -> None:
        # shutdown first: it wakes a thread blocked reading the stream (closing the buffered
        # reader while another thread reads it would wait for that read forever).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.rfile.close()
        self.sock.close()

    def __enter__(self) -> KernelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PerThreadClient:
    """A KernelClient per calling thread: the restore's PF and VF workers send their requests
    side by side (the kernel process serves connections concurrently) instead of queueing on one
    socket's lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.local = threading.local()
        self.lock = threading.Lock()
        self.clients: list[KernelClient] = [KernelClient(self.root)]
        self.local.client = self.clients[0]

    def get(self) -> KernelClient:
        client = getattr(self.local, "client", None)
        if client is None:
            client = KernelClient(self.root)
            with self.lock:
                self.clients.append(client)
            self.local.client = client
        return client

    def call(self, op: str, **args: Any) -> Any:
        return self.get().call(op, **args)

    def close(self) -> None:
        with self.lock:
            for client in self.clients:
                client.close()
            self.clients.clear()
