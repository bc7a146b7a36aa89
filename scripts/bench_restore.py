#!/usr/bin/env python3
"""Benchmark VF restore after a driver upgrade on simulated nodes (issue 4, "bench_restore").

Generates three scenarios (TOML, in a temporary directory) and runs `sim run` on each:

  eth-50     1 Ethernet PF x 50 VFs (the shape of shared/scenarios/upgrade-50vf-eth, no late VF)
  ib-8x8     8 InfiniBand PFs x 8 VFs, every VF with its own node and port GUID
  eth-8x127  8 Ethernet PFs x 127 VFs (1,016 VFs), one PF per bus

All with a driver upgrade (loaded != installed), openibd_restart_s 5, netdev_delay_s [0.2, 3.0],
udev renaming after [0.05, 0.5] s. Every figure comes from the simulator's report: restore_s against
restore_limit_s (the floor no restorer can beat) and against the floor given when each PF actually
came back in that run, the daemon's CPU seconds and peak RSS (wait4), VFs restored. "today" is the
sequential fixed-sleep algorithm's time on the same node: 4 s x (1 + VFs) per PF, summed over PFs
(also shown scaled by time_scale, to compare with the measured run).

    .venv/bin/python scripts/bench_restore.py [--only NAME] [--scale X] [--big-scale X]

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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mofed_lifecycle.sim.run import run_scenario  # noqa: E402

TODAY_S_PER_STEP = 4.0  # today's restore: one fixed 4 s sleep per PF and per VF, one after another
SMALL_SCALE, BIG_SCALE = 0.05, 0.5  # eth-8x127: its floor is ~1.75 s at 0.5 (>= 1 s)

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
"""


@dataclass(frozen=True)
class Bench:
    name: str
    pfs: int
    vfs_per_pf: int
    scale: float

    @property
    def vfs(self) -> int:
        return self.pfs * self.vfs_per_pf

    @property
    def today_s(self) -> float:
        return sum(TODAY_S_PER_STEP * (1 + self.vfs_per_pf) for _ in range(self.pfs))


def eth_50(scale: float) -> str:
    return HEAD.format(name="eth-50", scale=scale, seed=1) + """
[[pf]]
pci = "0000:01:00.0"
name = "enp1s0f0np0"
link = "eth"
mtu = 9000
numvfs = 50
totalvfs = 127
vf_name = "enp1s0f0v{vf}"
vf.all = { trust = true, spoofchk = false, link_state = "auto", mtu = 9000 }
vf.0 = { mac = "02:00:00:00:01:00" }
vf.1 = { mac = "02:00:00:00:01:01", vlan = 100 }
vf.2 = { mac = "02:00:00:00:01:02", trust = false, spoofchk = true }
"""


IB_BUSES = (0x18, 0x40, 0x4F, 0x5E, 0x9A, 0xC0, 0xCE, 0xDC)  # a DGX-class layout


def ib_8x8(scale: float) -> str:
    out = [HEAD.format(name="ib-8x8", scale=scale, seed=3)]
    for p, bus in enumerate(IB_BUSES):
        out.append(f"""
[[pf]]
pci = "0000:{bus:02x}:00.0"
name = "ibp{bus}s0"
link = "ib"
mtu = 4092
numvfs = 8
vf_name = "ibp{bus}s0v{{vf}}"
""")
        for v in range(8):
            out.append(f'vf.{v} = {{ node_guid = "00:11:22:33:44:{p:02x}:{v:02x}:00", '
                       f'port_guid = "00:11:22:33:44:{p:02x}:{v:02x}:01" }}\n')
    return "".join(out)


def eth_8x127(scale: float) -> str:
    # PFs on buses 0x10..0x17: a PF at B:00.0 has its 127 VFs at B:00.2 .. B:10.0, inside its bus.
    out = [HEAD.format(name="eth-8x127", scale=scale, seed=5)]
    for bus in range(0x10, 0x18):
        out.append(f"""
[[pf]]
pci = "0000:{bus:02x}:00.0"
name = "enp{bus}s0f0np0"
link = "eth"
mtu = 9000
numvfs = 127
totalvfs = 127
vf_name = "enp{bus}s0f0v{{vf}}"
vf.all = {{ trust = true, spoofchk = false, mtu = 9000 }}
vf.0 = {{ mac = "02:00:00:00:{bus:02x}:00", vlan = 10 }}
""")
    return "".join(out)


def default_node_dir() -> str | None:
    """tmpfs when there is one (see mofed_lifecycle.sim.run.node_dir)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


SCENARIOS = {"eth-50": (eth_50, 1, 50), "ib-8x8": (ib_8x8, 8, 8), "eth-8x127": (eth_8x127, 8, 127)}


def fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def row(b: Bench, r: dict[str, Any]) -> dict[str, str]:
    d = r.get("daemon") or {}
    cpu = d.get("cpu_s")
    return {
        "scenario": b.name,
        "VFs": str(b.vfs),
        "time_scale": f"{b.scale:g}",
        "restore_s": fmt(r.get("restore_s")),
        "floor_s": fmt(r.get("restore_limit_s")),
        "ratio": fmt(r.get("restore_ratio"), 3),
        "PF-aware floor_s": fmt(r.get("restore_limit_node_s")),
        "ratio (PF-aware)": fmt(r.get("restore_ratio_node"), 3),
        "disruption_s": fmt(r.get("disruption_s")),
        "CPU s": fmt(cpu, 3),
        "CPU ms/VF": fmt(None if cpu is None else cpu * 1000 / max(b.vfs, 1), 2),
        "peak RSS MiB": fmt(d.get("max_rss_mib"), 1),
        "sim kernel CPU s": fmt((r.get("simulator") or {}).get("kernel_cpu_s"), 3),
        "run s": fmt(r.get("duration_s"), 2),
        "VFs restored": f"{r['vfs']['restored']}/{r['vfs']['total']}",
        "outcome": str(r.get("outcome")),
        "today_s (scaled)": fmt(b.today_s * b.scale, 2),
        "today_s (real node)": fmt(b.today_s, 0),
    }


def markdown(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SCENARIOS), action="append",
                    help="run only this scenario (repeatable)")
    ap.add_argument("--scale", type=float,
                    help=f"time_scale for every scenario (default {SMALL_SCALE} for eth-50 and "
                         f"ib-8x8, --big-scale for eth-8x127)")
    ap.add_argument("--big-scale", type=float, default=BIG_SCALE,
                    help="time_scale of eth-8x127 when --scale is not given (default %(default)s: "
                         "its floor is then >= 1 s, so per-request overhead is measured fairly)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the lifecycle, over the scenario's (repeatable)")
    ap.add_argument("--report-dir", type=Path, help="also write each run's JSON report here")
    ap.add_argument("--node-dir", default=default_node_dir(),
                    help="where the simulated nodes live (default: /dev/shm when writable, else "
                         "the system's temporary directory)")
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)

    rows: list[dict[str, str]] = []
    crashed = []
    print(f"simulated nodes under {args.node_dir or tempfile.gettempdir()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-restore-", dir=args.node_dir) as tmp:
        for name in args.only or list(SCENARIOS):
            make, pfs, per_pf = SCENARIOS[name]
            scale = args.scale or (args.big_scale if name == "eth-8x127" else SMALL_SCALE)
            b = Bench(name, pfs, per_pf, scale)
            path = Path(tmp) / f"{name}.toml"
            path.write_text(make(scale))
            root = Path(tmp) / name
            try:
                r = run_scenario(path, root=root, env_overrides=env or None).report
            except Exception:  # noqa: BLE001 - report the crash, go on with the others
                crashed.append(name)
                print(f"{name}: run crashed\n{traceback.format_exc()}", file=sys.stderr)
                continue
            finally:
                shutil.rmtree(root, ignore_errors=True)
            if args.report_dir:
                args.report_dir.mkdir(parents=True, exist_ok=True)
                (args.report_dir / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
            x = row(b, r)
            rows.append(x)
            print(f"{name}: {x['VFs']} VFs, restore_s {x['restore_s']} vs floor {x['floor_s']} "
                  f"(x{x['ratio']}; PF-aware floor {x['PF-aware floor_s']}, "
                  f"x{x['ratio (PF-aware)']}), daemon {x['CPU s']} CPU s = {x['CPU ms/VF']} "
                  f"ms/VF, peak RSS {x['peak RSS MiB']} MiB, simulated kernel "
                  f"{x['sim kernel CPU s']} CPU s in a {x['run s']} s run, VFs restored "
                  f"{x['VFs restored']}, outcome {x['outcome']}; today's algorithm "
                  f"{x['today_s (real node)']} s on a real node = {x['today_s (scaled)']} s at "
                  f"time_scale {x['time_scale']}", flush=True)
            failed = r["vfs"]["failed"]
            if failed:
                print(f"  {len(failed)} VFs not restored, first: {failed[0]['pci']} differs "
                      f"{', '.join(failed[0]['differs'])}", flush=True)
    if rows:
        print()
        print(markdown(rows))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
