"""The restore's floor: the best schedule of the VFs' driver probes on the kernel's probe lanes.

A bind write lasts its VF's probe, and the kernel runs at most `[udev] probe_parallel` probes at
once (contract version 2); udev renames a netdev `rename_delay_s` after its probe ends. No restorer
can have every VF ready sooner than the best schedule of those probes on the lanes, each PF's VFs
from when that PF came back: with one lane, the sum of the probes. The schedule here is list
scheduling, longest probe first (within 4/3 of the optimum, and equal to it with one lane up to
the last rename). Pure; times in scaled seconds.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

Job = tuple[float, float]  # (probe, rename after it), scaled seconds


def probe_floor(jobs: Mapping[str, Sequence[Job]], release: Mapping[str, float],
                lanes: int, *, in_order: bool = False) -> float | None:
    """When the last VF is ready, from the first PF's return, if the PFs (keys of `jobs`) came
    back at `release` (PFs absent there never came back: their VFs are not counted). None when
    no PF with VFs came back. `in_order`: the probes in the order given (VF order, each PF from
    its return), as a restorer that cannot know the probe times hands them to the kernel: the
    best such a restorer can do, against the longest-first schedule that knows them."""
    back = {p: t for p, t in release.items() if jobs.get(p)}
    if not back:
        return None
    first = min(back.values())
    order = sorted(((back[p] - first, probe, rename) for p in back for probe, rename in jobs[p]),
                   key=lambda j: (j[0],) if in_order else (j[0], -(j[1] + j[2])))
    free = [0.0] * max(1, lanes)
    ready = 0.0
    for rel, probe, rename in order:
        start = max(heapq.heappop(free), rel)
        heapq.heappush(free, start + probe)
        ready = max(ready, start + probe + rename)
    return round(ready, 6)
