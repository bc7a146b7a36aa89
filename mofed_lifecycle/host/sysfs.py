"""sysfs attribute writes (`sriov_numvfs`, `bind`, `driver_override`...), answered by errno.

A write to a sysfs attribute is a request to the kernel, like a netlink message: it can fail with
EBUSY or ENOENT, and in some drivers it can hang. `KernelSysfs` writes the real file under a
deadline; the simulated node's kernel answers the same calls (`sim.sysfs.SimSysfs`).
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Protocol


class SysfsWriter(Protocol):
    def write(self, path: Path, value: str) -> None:
        """Write `value` to the attribute at `path` (a local path under the node root).

        Raises OSError with the kernel's errno (EBUSY, ENOENT, EINVAL...), or TimeoutError.
        """
        ...


class KernelSysfs:
    """Writes real sysfs attributes, each under a deadline (a hung write is reported)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    def write(self, path: Path, value: str) -> None:
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, value.encode())
                finally:
                    os.close(fd)
                outcome.append(None)
            except OSError as e:
                outcome.append(OSError(e.errno, f"writing {value!r} to {path}: {e.strerror}",
                                       str(path)))

        t = threading.Thread(target=attempt, name=f"sysfs-write {path.name}", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            raise TimeoutError(errno.ETIMEDOUT, f"writing {value!r} to {path} did not return "
                               "within "
                               f"{self.timeout_s:.0f}s (the driver may be stuck: check dmesg)")
        if outcome and outcome[0] is not None:
            raise outcome[0]
