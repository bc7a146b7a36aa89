"""VF binds written concurrently by a bounded pool of writer threads.

A bind write returns only when the VF's driver probe has finished (the kernel probes inside the
write). From one thread, binding N VFs takes the sum of their probes; with a pool of writers, where
the kernel and firmware probe in parallel the restore takes about the slowest probe, and where
they serialise nothing is lost (the writes wait their turn inside the kernel).

The writers are daemon threads and nobody joins them: a probe that never ends keeps its write
(and its thread) in the kernel, and no deadline or stop may wait for it. The restore stops waiting
at its deadline and reports that VF; a write that ends after `close()` is dropped.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .model import VfSnapshot
from .plan import NETDEV_DRIVER
from .readiness import Readiness

if TYPE_CHECKING:
    from .restore import Restorer

Job = Callable[[], None]


class Binder:
    def __init__(self, workers: int, name: str = "bind") -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(max(1, workers))]
        self.started = False  # the writers start with the first job

    def submit(self, job: Job) -> None:
        """Run `job` on a writer (in submission order); its exceptions are the job's to handle."""
        with self.lock:
            if not self.started:
                self.started = True
                for t in self.threads:
                    t.start()
        self.jobs.put(job)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not self.closed.is_set():
                job()

    def close(self) -> None:
        """No more jobs; queued ones are dropped. Writers stuck in the kernel are left there."""
        self.closed.set()
        if self.started:
            for _ in self.threads:
                self.jobs.put(None)


def bind_vfs(r: Restorer, vfs: list[VfSnapshot], readiness: Readiness) -> None:
    """Hand every VF's bind to the restore's writers (each write lasts its VF's probe); the
    netdevs they bring are waited for by udev event like any other. Until its write has
    returned a VF is in `r.binding`: the restore waits for it (up to its deadline) and reports
    one still there as not restored."""
    for vf in vfs:
        if vf.driver is None:
            continue
        readiness.expect(vf.pci, vf.netdev, vf.driver, check_now=False)
        with r.lock:
            r.binding.add(vf.pci)
        r.binder.submit(functools.partial(bind_one, r, vf))


def bind_one(r: Restorer, vf: VfSnapshot) -> None:
    """On a writer: the bind (it returns when the probe has ended), then its outcome."""
    from .restore import RestoreAborted  # restore.py imports this module

    error = None
    try:
        r.bind(vf, vf.driver or NETDEV_DRIVER)
    except (OSError, RestoreAborted) as e:
        error = str(e)
    with r.lock:
        if r.binder.closed.is_set():  # the restore has been reported already
            return
        r.binding.discard(vf.pci)
        if error is not None:
            r.result.failed[vf.pci] = error
            r.log.error("restore.vf_failed", vf=vf.pci, error=error)
