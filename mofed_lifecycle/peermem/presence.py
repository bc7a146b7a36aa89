"""The handshake between a watching peermem loader and the NIC lifecycle, both ours.

A watching loader holds an flock on `.peermem-loader.lock` beside the NIC readiness marker (the
drivers mount both sides see). When the lifecycle is about to reload the driver and nvidia_peermem
is loaded, it asks `wait_for_peermem_unload`: with a loader watching, the loader unloads the module
as soon as the marker vanished (the lifecycle clears it at startup), so the lifecycle gives it up to
PEERMEM_UNLOAD_WAIT_SEC; with none, or once the module has users (the loader never unloads a module
in use), there is nothing to wait for. The lifecycle then re-reads the module facts, and its
preflight unloads an unused nvidia_peermem itself or refuses the reload while it has users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..host.paths import NodePaths
from .checks import MODULE

LOCK_NAME = ".peermem-loader.lock"


def presence_path(paths: NodePaths, config: Config) -> Path:
    return paths.resolve(config.driver_ready_path).with_name(LOCK_NAME)


class LoaderPresence:
    """Held by a watching loader for its lifetime (best effort: a read-only mount just means the
    lifecycle will not wait for us)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another loader watches already: it answers for both
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def loader_watching(path: Path) -> bool:
    """True while some loader holds the presence lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EACCES)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing drops our shared lock, if we got it
    return False


def _refcnt(module_dir: Path) -> int:
    try:
        return int((module_dir / "refcnt").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def wait_for_peermem_unload(paths: NodePaths, config: Config, stop: threading.Event | None,
                            log: Any) -> bool:
    """Before a reload: if nvidia_peermem is loaded and a loader watches, give the loader up to
    PEERMEM_UNLOAD_WAIT_SEC to unload it (`stop` set: wait no more; None: a stop is already under
    way and this wait is part of it). True if nvidia_peermem was loaded when called (the caller
    re-reads the module facts)."""
    module = paths.module(MODULE)
    if not module.is_dir():
        return False
    lock = presence_path(paths, config)
    budget = config.peermem_unload_wait_s
    if not loader_watching(lock):
        log.info("peermem.no_loader", lock=str(lock),
                 next="no peermem loader watches: preflight unloads nvidia_peermem if unused")
        return True
    start = time.monotonic()
    pause = 0.01
    while module.is_dir():
        users = _refcnt(module)
        waited = round(time.monotonic() - start, 3)
        if users > 0:
            log.info("peermem.in_use", refcnt=users, waited_s=waited,
                     next="the loader does not unload a module in use: preflight decides")
            return True
        left = budget - (time.monotonic() - start)
        if left <= 0:
            log.warning("peermem.unload_wait_expired", budget_s=budget,
                        next="the loader did not unload nvidia_peermem in time: preflight "
                             "unloads it (refcnt 0)")
            return True
        if (stop or threading.Event()).wait(min(pause, left)):  # a stop request ends it at once
            return True
        pause = min(pause * 2, 0.2)
    log.info("peermem.unloaded_by_loader", waited_s=round(time.monotonic() - start, 3))
    return True


__all__ = ["LOCK_NAME", "LoaderPresence", "loader_watching", "presence_path",
           "wait_for_peermem_unload"]
