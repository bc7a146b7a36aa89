#!/usr/bin/env python3
"""SIGTERM at every point of the lifecycle, ten times each (issue 11, item 2), on the red team's
4-PF mixed node (tests/scenarios/mixed-4pf.toml: Ethernet, IB, switchdev, vfio), each trial on a
fresh simulated node: the daemon is signalled as soon as it logs the point (`state.entered` of each
state, and `openibd.restart`), then the node's ground truth is checked (exit 0, no blacklist, no
marker, driver untouched or swapped whole, every module and VF setting as before).

    .venv/bin/python scripts/bench_sigterm.py [--trials N]

Prints, per point, the trials, failures and the time from the signal to the exit (median, worst)
against the SIGTERM budget `status` prints for the same configuration. Exits 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_sigterm_everywhere import BUDGET, ENV, POINTS, run_trials  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="trials per point (default 10)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sigterm-") as tmp:
        results = run_trials(Path(tmp), args.trials)
    print(f"config: {' '.join(f'{k}={v}' for k, v in ENV.items() if k != 'NVIDIA_NIC_DRIVER_VER')}"
          f"; SIGTERM budget {BUDGET:g}s")
    print(f"{'point':<16}{'trials':>7}{'failed':>8}{'median_s':>10}{'worst_s':>9}")
    failed = 0
    for point in POINTS:
        mine = [(t, why) for p, t, why in results if p == point]
        bad = [why for _, why in mine if why]
        failed += len(bad)
        times = [t for t, _ in mine]
        print(f"{point:<16}{len(mine):>7}{len(bad):>8}{statistics.median(times):>10.3f}"
              f"{max(times):>9.3f}")
        for why in sorted(set(bad)):
            print(f"    {why}")
    worst = max(t for _, t, _ in results)
    print(f"all: {len(results)} SIGTERMs, {failed} failed, worst {worst:.3f}s from signal to exit "
          f"(budget {BUDGET:g}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
