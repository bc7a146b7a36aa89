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

import queue
import threading
from collections.abc import Callable

Job = Callable[[], None]


class Binder:
    def __init__(self, workers: int, name: str = "bind") -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(max(1, workers))]
        self.started = False  # the writers start with the first job

    def submit(self, job: Job) -> None:
        """Run `job` on a writer (in submission order); its exceptions are the job's to handle."""
        with self.lock:
            self.in_flight += 1
            if not self.started:
                self.started = True
                for t in self.threads:
                    t.start()
        self.jobs.put(job)

    def busy(self) -> int:
        """Jobs submitted and not finished."""
        with self.lock:
            return self.in_flight

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if not self.closed.is_set():
                    job()
            finally:
                with self.lock:
                    self.in_flight -= 1

    def close(self) -> None:
        """No more jobs; queued ones are dropped. Writers stuck in the kernel are left there."""
        self.closed.set()
        if self.started:
            for _ in self.threads:
                self.jobs.put(None)
