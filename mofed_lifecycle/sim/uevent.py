"""udev events of the simulated node: libudev-format messages to umockdev listeners, plus a journal.

A process run with `LD_PRELOAD=libumockdev-preload.so UMOCKDEV_DIR=<root>` has its udev netlink
socket turned into a Unix socket `<root>/event<fd>`; sending a libudev monitor message there is how
its real libudev (and so pyudev) receives our events. The wire format (header "libudev\\0", magic
0xfeedcafe, MurmurHash2 of the subsystem for the in-kernel socket filter, NUL-separated
properties) is libudev's. Every event is also appended to `<root>/.sim/uevents.jsonl`.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

UDEV_MONITOR_MAGIC = 0xFEEDCAFE
HEADER = struct.Struct("=8sIIIIIIII")


def umockdev_preload() -> str | None:
    """The umockdev preload library if installed (Debian: package `umockdev`), else None."""
    for pattern in ("/usr/lib/*/libumockdev-preload.so.0", "/usr/lib*/libumockdev-preload.so.0",
                    "/usr/local/lib*/libumockdev-preload.so.0"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def umockdev_env(root: Path, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """An environment whose libudev sees `root` as /sys and receives its uevents
    (None: no umockdev)."""
    lib = umockdev_preload()
    if lib is None:
        return None
    base = dict(os.environ if env is None else env)
    preload = " ".join(p for p in (lib, base.get("LD_PRELOAD", "")) if p)
    return {**base, "LD_PRELOAD": preload, "UMOCKDEV_DIR": str(Path(root).resolve())}


def murmur2_32(data: bytes) -> int:
    """MurmurHash2 (32-bit, seed = length), as libudev hashes subsystem and devtype names."""
    m, n = 0x5BD1E995, len(data)
    h = n & 0xFFFFFFFF
    i = 0
    while n - i >= 4:
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
        i += 4
    rest = n - i
    if rest == 3:
        h ^= data[i + 2] << 16
    if rest >= 2:
        h ^= data[i + 1] << 8
    if rest >= 1:
        h ^= data[i]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def encode(props: dict[str, str]) -> bytes:
    """One libudev monitor message for `props` (which must hold ACTION, DEVPATH, SUBSYSTEM)."""
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in props.items())
    devtype = props.get("DEVTYPE")
    header = HEADER.pack(
        b"libudev\0",
        socket.htonl(UDEV_MONITOR_MAGIC),
        HEADER.size,
        HEADER.size,
        len(body),
        socket.htonl(murmur2_32(props["SUBSYSTEM"].encode())),
        socket.htonl(murmur2_32(devtype.encode())) if devtype else 0,
        0,
        0,
    )
    return header + body


def decode(msg: bytes) -> dict[str, str]:
    """The properties of a libudev monitor message (used by tests and the fallback listener)."""
    prefix, magic, _hs, off, length, *_ = HEADER.unpack_from(msg)
    if prefix != b"libudev\0" or socket.ntohl(magic) != UDEV_MONITOR_MAGIC:
        raise ValueError("not a libudev monitor message")
    fields = msg[off:off + length].split(b"\0")
    return dict(f.decode().split("=", 1) for f in fields if f)


class UeventBus:
    """Delivers each event to umockdev listeners, the journal and in-process subscribers."""

    def __init__(self, root: Path, seqnum: Callable[[], int]) -> None:
        self.root = root
        self.seqnum = seqnum
        self.journal = (root / ".sim" / "uevents.jsonl").open("a", buffering=1)
        self.subscribers: list[Callable[[dict[str, str]], None]] = []
        self._listeners: tuple[int, list[str]] = (-1, [])

    def listeners(self) -> list[str]:
        """umockdev listener sockets in the root (re-listed only when the root changes)."""
        mtime = os.stat(self.root).st_mtime_ns
        if mtime != self._listeners[0]:
            self._listeners = (mtime, glob.glob(str(self.root / "event[0-9]*")))
        return self._listeners[1]

    def emit(self, action: str, devpath: str, subsystem: str, **extra: str) -> None:
        props = {"ACTION": action, "DEVPATH": devpath, "SUBSYSTEM": subsystem,
                 "SEQNUM": str(self.seqnum()), **extra}
        self.journal.write(json.dumps({"t": round(time.time(), 6), **props}) + "\n")
        msg = encode(props)
        for path in self.listeners():
            self._send(path, msg)
        for cb in list(self.subscribers):
            cb(props)

    @staticmethod
    def _send(path: str, msg: bytes) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_RAW | socket.SOCK_NONBLOCK)
        try:
            s.connect(path)
            for _ in range(50):
                try:
                    s.send(msg)
                    return
                except BlockingIOError:
                    time.sleep(0.001)  # sleep-ok: listener's queue full; bounded 50 ms
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                Path(path).unlink(missing_ok=True)  # the listener went away
        finally:
            s.close()
