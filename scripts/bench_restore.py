#!/usr/bin/env python3
"""Benchmark VF restore against synchronous probes on simulated nodes (issue 13, item 4).

A bind write returns only when the VF's driver probe has finished, and the kernel runs at most
`[udev] probe_parallel` probes at once. For probe_parallel 1, 4 and 16 on three driver-upgrade
nodes, it runs `sim run` and reports the restore time against its floor, the best schedule of the
VFs' probes on the lanes from when each PF came back (sim/floor.py):

  64     1 Ethernet PF x 64 VFs
  256    4 Ethernet PFs x 64 VFs
  1016   8 Ethernet PFs x 127 VFs (one PF per bus)

All with openibd_restart_s 5, netdev_delay_s (the probe) [0.2, 3.0] s, udev renaming after
[0.05, 0.5] s. Each run's time_scale is chosen so that its floor is at least --floor-s seconds
(per-request overhead is then measured fairly), and figures are shown in the run's seconds and as
real-node seconds (divided by time_scale). "bash" is the upstream entrypoint's algorithm on the
same node: per PF one after another, a fixed 4 s sleep, then per VF a bind (its probe) and a 4 s
sleep. The target is restore <= 1.05 x floor + 0.2 s (in the run's seconds).

    .venv/bin/python scripts/bench_restore.py [--only 64|256|1016] [--lanes N] [--floor-s S]

Prints; never asserts. Exits non-zero only if a run crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mofed_lifecycle.sim.floor import probe_floor  # noqa: E402
from mofed_lifecycle.sim.run import run_scenario  # noqa: E402
from mofed_lifecycle.sim.scenario_parse import parse_scenario  # noqa: E402

BASH_SLEEP_S = 4.0  # the upstream entrypoint: `sleep 4` per PF and per VF, one after another
LANES = (1, 4, 16)
MIN_SCALE = 0.01

HEAD = """[node]
name = "{name}"
kernel = "5.14.0-427.96.1.el9_4.x86_64"
time_scale = {scale}
seed = {seed}

[driver]
loaded_version = "25.07-0.9.7"
installed_version = "25.10-1.2.8"
openibd_restart_s = 5

[udev]
netdev_delay_s = [0.2, 3.0]
rename = true
rename_delay_s = [0.05, 0.5]
probe_parallel = {lanes}
"""


@dataclass(frozen=True)
class Shape:
    name: str
    pfs: int
    vfs_per_pf: int

    @property
    def vfs(self) -> int:
        return self.pfs * self.vfs_per_pf

    def scenario(self, lanes: int, scale: float) -> str:
        out = [HEAD.format(name=f"restore-{self.name}-x{lanes}", scale=scale, seed=13,
                           lanes=lanes)]
        for p in range(self.pfs):
            bus = 0x10 + p
            out.append(f"""
[[pf]]
pci = "0000:{bus:02x}:00.0"
name = "enp{bus}s0f0np0"
link = "eth"
mtu = 9000
numvfs = {self.vfs_per_pf}
totalvfs = 127
vf_name = "enp{bus}s0f0v{{vf}}"
vf.all = {{ trust = true, spoofchk = false, mtu = 9000 }}
vf.0 = {{ mac = "02:00:00:00:{bus:02x}:00", vlan = 10 }}
""")
        return "".join(out)


SHAPES = {s.name: s for s in (Shape("64", 1, 64), Shape("256", 4, 64), Shape("1016", 8, 127))}


def bash_s(text: str) -> float:
    """The upstream algorithm's restore on this node, real-node seconds (unscaled)."""
    sc = parse_scenario(text)
    return sum(BASH_SLEEP_S + sum(BASH_SLEEP_S + probe for probe, _rename in jobs)
               for jobs in sc.vf_probes().values())


def default_node_dir() -> str | None:
    """tmpfs when there is one (see mofed_lifecycle.sim.run.node_dir)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def one(shape: Shape, lanes: int, floor_s: float, tmp: Path, env: dict[str, str]
        ) -> dict[str, str]:
    unscaled = shape.scenario(lanes, 1.0)
    floor_real = parse_scenario(unscaled).restore_limit_s()
    scale = max(MIN_SCALE, floor_s / floor_real) if floor_real else MIN_SCALE
    path = tmp / f"{shape.name}-x{lanes}.toml"
    path.write_text(shape.scenario(lanes, round(scale, 6)))
    root = tmp / f"{shape.name}-x{lanes}"
    try:
        r = run_scenario(path, root=root, env_overrides=env or None).report
    finally:
        shutil.rmtree(root, ignore_errors=True)
    restore, floor = r.get("restore_s"), r.get("restore_limit_node_s") or r.get("restore_limit_s")
    # the same probes in VF order (what a restorer that cannot know probe times can do at best)
    sc = parse_scenario(path.read_text())
    in_order = probe_floor(sc.vf_probes(), (r.get("restore_marks") or {}).get("pf_back") or {},
                           lanes, in_order=True)
    target = None if floor is None else 1.05 * floor + 0.2
    d = r.get("daemon") or {}
    bash = bash_s(unscaled)
    return {
        "VFs": str(shape.vfs), "probe_parallel": str(lanes), "time_scale": f"{scale:.4g}",
        "restore_s": fmt(restore), "floor_s": fmt(floor),
        "ratio": fmt(None if restore is None or not floor else restore / floor),
        "in-order floor_s": fmt(in_order),
        "ratio (in-order)": fmt(None if restore is None or not in_order else restore / in_order),
        "target_s": fmt(target),
        "met": "-" if restore is None or target is None else ("yes" if restore <= target
                                                              else "NO"),
        "restore (real node s)": fmt(None if restore is None else restore / scale, 1),
        "floor (real node s)": fmt(None if floor is None else floor / scale, 1),
        "bash (real node s)": fmt(bash, 0),
        "daemon CPU s": fmt(d.get("cpu_s")),
        "sim kernel CPU s": fmt((r.get("simulator") or {}).get("kernel_cpu_s")),
        "VFs restored": f"{r['vfs']['restored']}/{r['vfs']['total']}",
        "outcome": str(r.get("outcome")),
        "_report": json.dumps(r),
    }


def markdown(rows: list[dict[str, str]]) -> str:
    cols = [c for c in rows[0] if not c.startswith("_")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SHAPES), action="append",
                    help="run only this node (repeatable)")
    ap.add_argument("--lanes", type=int, action="append", help="only this probe_parallel "
                    "(repeatable; default 1, 4 and 16)")
    ap.add_argument("--floor-s", type=float, default=3.0,
                    help="each run's time_scale makes its floor at least this many seconds "
                         "(default %(default)s; never below time_scale 0.01)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the lifecycle, over the scenario's (repeatable)")
    ap.add_argument("--report-dir", type=Path, help="also write each run's JSON report here")
    ap.add_argument("--node-dir", default=default_node_dir(),
                    help="where the simulated nodes live (default: /dev/shm when writable)")
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    rows: list[dict[str, str]] = []
    crashed = []
    print(f"simulated nodes under {args.node_dir or tempfile.gettempdir()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-restore-", dir=args.node_dir) as tmp:
        for name in args.only or list(SHAPES):
            for lanes in args.lanes or LANES:
                try:
                    x = one(SHAPES[name], lanes, args.floor_s, Path(tmp), env)
                except Exception:  # noqa: BLE001 - report the crash, go on with the others
                    crashed.append(f"{name} x{lanes}")
                    print(f"{name} x{lanes}: run crashed\n{traceback.format_exc()}",
                          file=sys.stderr)
                    continue
                if args.report_dir:
                    args.report_dir.mkdir(parents=True, exist_ok=True)
                    (args.report_dir / f"{name}-x{lanes}.json").write_text(x["_report"])
                rows.append(x)
                print(f"{x['VFs']} VFs, probe_parallel {lanes}: restore {x['restore_s']} s vs "
                      f"floor {x['floor_s']} s (x{x['ratio']}; target {x['target_s']} s: "
                      f"{x['met']}; in VF order {x['in-order floor_s']} s, "
                      f"x{x['ratio (in-order)']}); on a real node "
                      f"{x['restore (real node s)']} s vs bash {x['bash (real node s)']} s; "
                      f"daemon {x['daemon CPU s']} CPU s, VFs "
                      f"restored {x['VFs restored']}, outcome {x['outcome']}", flush=True)
    if rows:
        print()
        print(markdown(rows))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
