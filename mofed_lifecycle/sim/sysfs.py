"""The simulated side of the sysfs seam: attribute writes answered by the node's kernel process."""

from __future__ import annotations

from pathlib import Path

from .client import KernelClient, SimKernelError


class SimSysfs:
    def __init__(self, client: KernelClient) -> None:
        self.client = client

    def write(self, path: Path, value: str) -> None:
        rel = (Path(path).resolve().relative_to(self.client.root) if Path(path).is_absolute()
               else path)
        try:
            self.client.call("sysfs_write", path=str(rel), value=value)
        except SimKernelError as e:
            raise OSError(e.errno, f"writing {value!r} to {path}: {e.strerror}",
                          str(path)) from None
