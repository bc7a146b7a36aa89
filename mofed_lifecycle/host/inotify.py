"""inotify(7) through ctypes: wait for files to appear, change or vanish, without polling.

No dependency: three libc calls (`inotify_init1`, `inotify_add_watch`, `inotify_rm_watch`) and
`select`. `FileWatcher` watches a set of files by watching their directories — or, for a file whose
directory does not exist yet, the nearest existing ancestor, re-armed as the path is created — and
reports only events about those files. `wake()` (safe in a signal handler) ends a wait at once.

inotify sees regular filesystems (tmpfs /run, /lib/modules, /etc), not sysfs or procfs: what lives
there (`/sys/module`, `/proc/kallsyms`) must be re-read on a timer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import time
from dataclasses import dataclass
from pathlib import Path

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
DIR_MASK = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB
            | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not glibc/musl: no inotify
    _LIBC = None


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str


class Inotify:
    """One inotify instance plus a wake-up pipe."""

    def __init__(self) -> None:
        if _LIBC is None or not hasattr(_LIBC, "inotify_init1"):
            raise OSError(errno.ENOSYS, "inotify is not available on this system")
        fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def add_watch(self, path: Path, mask: int) -> int:
        wd = _LIBC.inotify_add_watch(self.fd, os.fsencode(str(path)), mask)  # type: ignore[union-attr]
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_add_watch {path}: {os.strerror(e)}")
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        _LIBC.inotify_rm_watch(self.fd, wd)  # type: ignore[union-attr]  # gone already: fine

    def wake(self) -> None:
        """End the current (or next) wait at once; async-signal-safe."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def read(self, timeout: float | None) -> tuple[list[Event], bool]:
        """Events available within `timeout` seconds (None: wait for ever), and whether a wake()
        came."""
        r, _, _ = select.select([self.fd, self._wake_r], [], [], timeout)
        woken = False
        if self._wake_r in r:
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 512):
                    pass
            woken = True
        events: list[Event] = []
        if self.fd in r:
            while True:
                try:
                    buf = os.read(self.fd, 64 * 1024)
                except BlockingIOError:
                    break
                off = 0
                while off + _EVENT.size <= len(buf):
                    wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
                    raw = buf[off + _EVENT.size: off + _EVENT.size + n]
                    events.append(Event(wd, mask, os.fsdecode(raw.rstrip(b"\0"))))
                    off += _EVENT.size + n
        return events, woken

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class FileWatcher:
    """Waits for changes to a set of files (created, rewritten, renamed over, touched, removed)."""

    def __init__(self, files: list[Path] | None = None) -> None:
        self.inotify = Inotify()
        self.targets: set[Path] = set(files or ())
        self._names: dict[int, set[str]] = {}  # wd -> names in that directory we care about
        self.arm()

    def watch(self, path: Path) -> None:
        if path not in self.targets:
            self.targets.add(path)
            self.arm()

    def unwatch(self, path: Path) -> None:
        if path in self.targets:
            self.targets.discard(path)
            self.arm()

    def arm(self) -> None:
        """(Re)place the watches: each target's directory, or its nearest existing ancestor."""
        names: dict[int, set[str]] = {}
        for target in self.targets:
            child, d = target.name, target.parent
            while not d.is_dir() and d != d.parent:
                child, d = d.name, d.parent
            try:
                wd = self.inotify.add_watch(d, DIR_MASK)
            except OSError:
                continue  # unreadable: the timer re-check still covers it
            names.setdefault(wd, set()).add(child)
        for wd in set(self._names) - set(names):
            self.inotify.rm_watch(wd)
        self._names = names

    def wake(self) -> None:
        self.inotify.wake()

    def wait(self, timeout: float | None) -> bool:
        """True as soon as a watched file changed (or a wake()); False at the timeout."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            events, woken = self.inotify.read(left)
            relevant = woken or any(self._relevant(e) for e in events)
            if relevant:
                self.arm()  # a directory on the way may have appeared or gone
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _relevant(self, e: Event) -> bool:
        if e.mask & (IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
            return e.wd in self._names or e.mask & IN_Q_OVERFLOW != 0
        return e.name in self._names.get(e.wd, ())

    def close(self) -> None:
        self.inotify.close()


__all__ = ["Event", "FileWatcher", "Inotify"]
