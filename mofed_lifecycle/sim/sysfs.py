"""The simulated side of the sysfs seam: attribute writes answered by the node's kernel process."""

from __future__ import annotations

import os
from pathlib import Path

from .client import KernelClient, PerThreadClient
from .errors import SimKernelError


class SimSysfs:
    def __init__(self, client: KernelClient | PerThreadClient) -> None:
        self.client = client

    def write(self, path: Path, value: str) -> None:
        # relative to the root, symlinks unresolved: the kernel resolves them (no lstat storm
        # through umockdev's preload on every write)
        rel = os.path.relpath(path, self.client.root) if os.path.isabs(path) else str(path)
        try:
            self.client.call("sysfs_write", path=str(rel), value=value)
        except SimKernelError as e:
            raise OSError(e.errno, f"writing {value!r} to {path}: {e.strerror}",
                          str(path)) from None
