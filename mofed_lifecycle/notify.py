"""sd_notify(3) without a dependency: datagrams to the socket systemd names in `NOTIFY_SOCKET`.

Under a `Type=notify` unit systemd sets `NOTIFY_SOCKET` (a filesystem path, or `@name` for a
Linux abstract socket) and, with `WatchdogSec=`, `WATCHDOG_USEC` (and `WATCHDOG_PID`). The daemon
sends newline-separated `KEY=value` assignments: `STATUS=...` on every state change, `READY=1` once
the readiness marker is set, `STOPPING=1` when it stops, `WATCHDOG=1` periodically. Anywhere else
(a container, a terminal, the tests without a socket) `NOTIFY_SOCKET` is unset and every call is a
no-op. A failure to send is never fatal: it is logged once and the lifecycle goes on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from .log import get_logger

SEND_TIMEOUT_S = 1.0  # a receiver that stopped reading must never stall the driver lifecycle


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a `NOTIFY_SOCKET` value: `@name` is the abstract `\\0name`."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # systemd also allows vsock:..., which a NIC driver daemon never runs under


def watchdog_interval_s(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, or when `WATCHDOG_PID` names another process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid if pid is not None else os.getpid()):
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Sends sd_notify messages to `NOTIFY_SOCKET`; every method is a no-op when it is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = watchdog_interval_s(env) if self.address else None
        self.ready_sent = False
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; True if it was sent."""
        if self.address is None:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(SEND_TIMEOUT_S)
                s.sendto(data, self.address)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                get_logger("notify").warning("notify.failed", socket=self.address.lstrip("\0"),
                                             error=str(e), next="systemd will not see this "
                                             "daemon's status; check NOTIFY_SOCKET")
            return False

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def ready(self, text: str) -> bool:
        """READY=1 (at most once: systemd ignores repeats, we do not send them)."""
        if self.ready_sent:
            return self.status(text)
        self.ready_sent = self.send("READY=1", f"STATUS={text}")
        return self.ready_sent

    def stopping(self, text: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1") if self.watchdog_s else False
