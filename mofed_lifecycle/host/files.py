"""Files the daemon owns on the node: atomic writes, the instance lock, markers.

An atomic write is temp file + fsync + rename + fsync of the directory: after a crash (or SIGKILL)
a reader sees the old content or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` atomically and durably (creates the directory if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a random name created with O_EXCL (mkstemp) in the target directory: a symlink planted at a
    # predictable name (the PID is 1 in a container) can never redirect the write
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces a symlink at `path` itself, never its target
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.filename is None:  # os.write/fsync name no file: "No space left on device" alone
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_file(path: Path) -> bool:
    """Remove `path` durably; True if it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def read_text_or_empty(path: Path) -> str:
    """A file's text, "" where it cannot be read (absent, a sysfs file gone with its device, no
    permission): for reads whose absence is itself the answer."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def read_value(path: Path) -> str:
    """A sysfs or /proc value, stripped; "" where it cannot be read."""
    return read_text_or_empty(path).strip()


def read_json(path: Path) -> Any | None:
    """The JSON document at `path`, or None if it is absent or unreadable (a torn legacy file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json_record(path: Path, valid: Any) -> tuple[Any | None, str | None]:
    """A record the daemon wrote: (document, None) if it reads and `valid(doc)` holds; (None,
    None) if it is absent; (None, why) if it is damaged (unreadable, not JSON, wrong shape)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: unreadable ({e.strerror})"
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        return None, f"{path}: not valid JSON ({str(e)[:80]})"
    verdict = valid(doc)  # True, or False / a reason why not
    if verdict is not True:
        why = verdict if isinstance(verdict, str) and verdict else "wrong JSON types"
        return None, f"{path}: not the expected record ({why})"
    return doc, None


def read_record_with_copy(path: Path, copy: Path,
                          valid: Any) -> tuple[Any | None, str | None, Path | None]:
    """(document, what was damaged or None, the file used): the record, or its copy if the
    record is damaged. Absent: (None, None, None); both damaged: (None, why, None)."""
    doc, why = read_json_record(path, valid)
    if why is None:  # read, or absent (deleted to start afresh: the copy is not resurrected)
        return doc, None, path if doc is not None else None
    spare, why_copy = read_json_record(copy, valid)
    if spare is not None:
        return spare, why or f"{path}: absent", copy
    return None, "; ".join(w for w in (why, why_copy) if w) or None, None


class SpaceReserve:
    """A file of `size` bytes held on a filesystem so that, when it fills up, deleting it gives
    the writes that must not fail (the journal) room to land."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size

    def ensure(self) -> bool:
        """Create it if absent; False if there is no room for it (nothing is left behind)."""
        if self.path.exists():
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return True
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, self.size)  # really allocated, not a sparse hole
            os.fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return False
        os.close(fd)
        return True

    def release(self) -> bool:
        """Delete it; True if there was one to give back."""
        try:
            self.path.unlink()
        except OSError:
            return False
        return True


class LockHeld(RuntimeError):
    """Another instance holds the lock; `pid` is its process ID if it wrote one."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"another mofed-lifecycle instance ({who}) holds {path}: only one may run "
                         "per node; stop it first (or wait for it to finish)")
        self.pid = pid


class InstanceLock:
    """flock(2) on the lock file, holding our PID: one instance per node, released at exit/death."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LockHeld(self.path, self.holder_pid()) from None
            raise
        self.fd = fd
        # the lock is the flock; the PID in it is for people and probes: a full disk (ENOSPC)
        # must not stop the daemon that has to remove the host blacklist
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())

    def held(self, proc_locks: Path = Path("/proc/locks")) -> bool | None:
        """Whether some process holds the lock now, read without touching it (a probe must never
        take the lock a starting daemon wants): an flock on this file's inode in `/proc/locks` of
        the kernel we run on (which is the kernel holding the flock, under any --root). None when
        that cannot be read."""
        try:
            st = self.path.stat()
            text = proc_locks.read_text()
        except FileNotFoundError:
            return False if not self.path.exists() else None
        except OSError:
            return None
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        for line in text.splitlines():
            parts = line.split()
            if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                continue  # a waiter ("->"), or a POSIX/OFD lock
            try:
                major, minor, inode = parts[5].split(":")
                if (int(major, 16), int(minor, 16), int(inode)) == want:
                    return True
            except ValueError:
                continue
        return False

    def holder_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(self.path.read_text().split()[0])
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
