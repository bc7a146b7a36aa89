"""A simulated node's kernel served from a thread of the calling process instead of its own
process: the same `KernelServer`, socket and state file, without a Python start per node (the
test suite makes about two hundred nodes). Clients cannot tell the difference.

The kernel lock is held as the process kernel holds it (a process kernel started meanwhile exits
at once), but names no PID: `stop_kernel` signals the PID it finds there, and this one's would be
the caller itself. Stop it with `ThreadKernel.stop`.
"""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path

from .server import KernelServer, hold_kernel_lock

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
NO_PID = "in-thread\n"  # what kernel.lock says while a thread serves the node


class ThreadKernel:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        lock = hold_kernel_lock(self.root, NO_PID)
        if lock is None:
            raise RuntimeError(f"{self.root}: a kernel process already serves this node")
        self.lock = lock
        try:
            self.server = KernelServer(self.root, idle_exit_s=math.inf)
        except BaseException:  # a scenario or state it cannot read: the node as it was
            self._release()
            raise
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listening = threading.Event()
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"sim-kernel {self.root.name}",
                                       daemon=True)
        self.thread.start()
        if not self.listening.wait(START_TIMEOUT_S) or self.failed:
            self.stop()
            raise RuntimeError(f"the in-thread kernel of {self.root} did not start: "
                               f"{self.failed or 'no socket within the deadline'}")

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to the starter, not lost in a thread
            self.failed = e
            self.listening.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(listening=self.listening.set, signals=False)

    def stop(self) -> None:
        """Stop serving, save the state (as a SIGTERMed kernel process does), release the lock."""
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.stop.set)
        self.thread.join(STOP_TIMEOUT_S)
        self._release()

    def _release(self) -> None:
        if not self.lock.closed:
            self.lock.truncate(0)
            self.lock.close()  # releases the flock
