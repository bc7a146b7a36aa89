"""The `mofed-lifecycle` command: argument parsing, and every error mapped to an exit code.

Exit codes: 0 ok; 1 failed (the node could not be brought to the goal, or an operation failed);
2 bad usage or bad configuration (fix the command line, the environment or the scenario file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import __version__
from .config import ConfigError, load_config
from .log import configure_logging, get_logger

if TYPE_CHECKING:
    from .host.node import Node, Tools

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """\
exit codes:
  0  ok
  1  failed: the node could not be brought where it should be (the log says why and what next)
  2  bad usage or bad configuration: a wrong flag, environment variable or scenario file

Every host path is read under --root (default /): point it at a directory made by
`mofed-lifecycle sim init` to run against a simulated node. See `mofed-lifecycle sim --help`.
"""


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit 2."""


def _root(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"--root {value!r} is not a directory")
    return p.resolve()


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(
        prog="mofed-lifecycle", formatter_class=fmt, epilog=EPILOG,
        description="Owns the NVIDIA/Mellanox NIC driver (MOFED/DOCA) lifecycle on a GPU/RDMA "
                    "node:\ninspect -> decide -> snapshot SR-IOV -> reload -> restore VFs -> "
                    "ready.",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                    help="auto: JSON lines when stdout is not a terminal, console lines when it is")
    ap.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", formatter_class=fmt, epilog=EPILOG,
        help="the driver lifecycle (the driver container's entrypoint)",
        description="Run the NIC driver lifecycle on this node: the driver container's entrypoint "
                    "and the systemd unit's\nmain process. Configured by the environment variables "
                    "of the Network Operator (see README).",
    )
    run.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")
    run.add_argument("--once", action="store_true", help="exit 0 once ready instead of staying up")
    run.add_argument("--dry-run", action="store_true",
                     help="print the decision and the plan, change nothing; exit 1 if the "
                          "reload would be refused")

    pm = sub.add_parser(
        "peermem", formatter_class=fmt, epilog=EPILOG,
        help="load nvidia-peermem once the NIC driver is really ready (GPU side)",
        description="Wait for the NIC driver's readiness marker, check that what it promises is "
                    "true, then load nvidia-peermem.",
    )
    pm.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")
    pm.add_argument("--once", action="store_true", help="exit 0 once loaded")
    pm.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="give up after this many seconds (exit 1 naming what was missing); "
                         "default: never")
    pm.add_argument("--wait-gpu-driver", action="store_true",
                    help="also wait for the GPU driver's marker and the nvidia module "
                         "(PEERMEM_WAIT_GPU_DRIVER=true does the same): for a sidecar")

    pr = sub.add_parser(
        "probe", formatter_class=fmt,
        help="Kubernetes exec probe: startup, ready or live (exit 0 pass, 1 fail)",
        description="Check one thing that matters; print one line saying why (exit 0 pass, 1 "
                    "fail).\n  ready    marker valid JSON; each module's loaded srcversion = the "
                    "marker's = installed\n           (modinfo); VF restore finished\n  live     "
                    "heartbeat fresh; the current step not past its budget\n  startup  marker "
                    "set, or the daemon up and progressing\nRead-only (never takes the lock); "
                    "reads the variables `run` does (DRIVER_READY_PATH...).",
        epilog="examples (the DaemonSet's probes): mofed-lifecycle probe startup | ready | live",
    )
    pr.add_argument("which", choices=("startup", "ready", "live"), help="what to check")
    pr.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")
    pr.add_argument("--max-age", type=float, default=None, metavar="S",
                    help="live/startup: oldest acceptable heartbeat in seconds (default: 3 "
                         "heartbeat intervals, HEARTBEAT_INTERVAL_SEC)")

    stp = sub.add_parser(
        "status", formatter_class=fmt,
        help="one screen: state, driver versions, marker, VFs, lock holder, last error",
        description="What the daemon on this node is doing and has done, for an operator: "
                    "current state and since\nwhen, last transition, loaded and installed "
                    "srcversions, readiness marker, VFs restored or\nfailed, lock holder, "
                    "heartbeat, last error, and the SIGTERM budget. Read-only (no lock).",
        epilog="examples:\n"
               "  kubectl exec -n nvidia-network-operator POD -c mofed-container -- "
               "mofed-lifecycle status\n"
               "  mofed-lifecycle status --json | jq .vfs\n",
    )
    stp.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")
    stp.add_argument("--json", action="store_true", help="print the status as JSON")

    cfg = sub.add_parser(
        "config", formatter_class=fmt, epilog=EPILOG,
        help="check the environment and print the configuration it gives (secrets hidden)",
        description="Parse every environment variable the daemon honours (the Network Operator's "
                    "contract) and print\nthe resulting configuration as JSON, secrets hidden. "
                    "Exit "
                    "2 with one line naming the first bad\nvariable. Use it to check a pod's or a "
                    "unit's environment before starting the daemon.",
    )
    cfg.add_argument("--markdown", action="store_true",
                     help="print the table of variables, defaults and meanings instead")
    cfg.add_argument("--no-require-version", action="store_true",
                     help="accept an unset NVIDIA_NIC_DRIVER_VER (only `run` needs it)")

    sim = sub.add_parser(
        "sim", formatter_class=fmt,
        help="a simulated node: build one, inspect its ground truth, run the lifecycle on it",
        description="A simulated node is a directory standing in for `/` plus a kernel process "
                    "that gives it life:\nmodules with holders, SR-IOV, netdevs that appear late "
                    "and "
                    "are renamed by udev, udev events,\nand stand-ins for modprobe, modinfo, "
                    "openibd... Scenario files: see README and ../shared/scenario-format.md.",
        epilog="examples:\n"
               "  mofed-lifecycle sim init examples/upgrade-50vf-eth.toml --root /tmp/node\n"
               "  mofed-lifecycle sim state --root /tmp/node\n"
               "  mofed-lifecycle sim run examples/upgrade-50vf-eth.toml --report report.json\n",
    )
    ssub = sim.add_subparsers(dest="sim_command", metavar="SIM_COMMAND", required=True)
    si = ssub.add_parser("init", help="materialise a scenario into a node root",
                         description="Materialise SCENARIO into DIR (a tree standing in for /).")
    si.add_argument("scenario", help="scenario TOML file")
    si.add_argument("--root", required=True, type=Path,
                    help="directory for the node (new or empty)")
    si.add_argument("--force", action="store_true", help="rebuild DIR if it already holds a node")
    ss = ssub.add_parser("state", help="print the node's ground truth as JSON",
                         description="Print what the simulated kernel holds now (never what the "
                                     "daemon believes).")
    ss.add_argument("--root", required=True, type=_root)
    sr = ssub.add_parser("run", help="init a node, run the lifecycle on it, report",
                         description="Init SCENARIO in a temporary directory, run the lifecycle "
                                     "on it, print a timeline and write the JSON report.")
    sr.add_argument("scenario")
    sr.add_argument("--report", type=Path, help="write the JSON report here")
    sr.add_argument("--root", type=Path, help="use this directory instead of a temporary one")
    sr.add_argument("--keep", action="store_true", help="keep the temporary node afterwards")
    st = ssub.add_parser("stop", help="stop a node's kernel process",
                         description="Stop the kernel process of the node at DIR (it also stops "
                                     "by itself when idle).")
    st.add_argument("--root", required=True, type=_root)
    sv = ssub.add_parser("set-vf", help="change a VF as an administrator would (ip link set)",
                         description="What `ip link set PF vf N KEY VALUE...` does on the node "
                                     "at DIR. Keys: mac, vlan, qos, trust, spoofchk, link_state, "
                                     "min_tx_rate, max_tx_rate, node_guid, port_guid. Example: "
                                     "sim set-vf --root DIR 0000:08:00.0 1 vlan=900 trust=off")
    sv.add_argument("--root", required=True, type=_root)
    sv.add_argument("pf_pci", metavar="PF_PCI")
    sv.add_argument("vf_index", metavar="VF_INDEX", type=int)
    sv.add_argument("settings", metavar="KEY=VALUE", nargs="+")
    from .sim.admin import SET_ACTIONS

    ss = ssub.add_parser(
        "set", help="change the node as an operator or a failure would (modules, route, firmware)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Change the node at DIR at once, between or during runs. WHAT is one of:\n"
                    + "".join(f"  {w + ' ' + a:<34} {d}\n" for w, (a, d) in SET_ACTIONS.items())
                    + "Example: sim set --root DIR module-unload nvme_rdma")
    ss.add_argument("--root", required=True, type=_root)
    ss.add_argument("what", metavar="WHAT", nargs="+")
    return ap


@dataclass(frozen=True)
class Seams:
    """Which node a root gets, chosen once, here (the composition root): a root made by `sim init`
    gets the simulated kernel's seams, any other (`/` on a real node) the real ones. Nothing below
    the CLI asks which it got. `in_process`: a simulated node's tools run as calls in this process
    (tests drive `main(argv, Seams(in_process=True))`, without a process per command)."""

    in_process: bool = False

    def die(self) -> None:
        """What MOFED_LIFECYCLE_CRASH_AT does: SIGKILL this process; in-process, stop the run
        dead (`runner.Crashed`, which a test sees as the exit of a killed process)."""
        from .lifecycle.runner import Crashed, sigkill_self

        if self.in_process:
            raise Crashed
        sigkill_self()

    def node(self, root: Path) -> Node:
        from .sim.client import is_simulated

        if is_simulated(root):
            from .sim.seam import open_sim_node

            return open_sim_node(root, in_process=self.in_process)
        from .host.node import open_node

        return open_node(root)

    def tools(self, root: Path) -> Tools:
        """The read-only view (paths, tools) for status, probes and the peermem loader."""
        from .sim.client import is_simulated

        if is_simulated(root):
            from .sim.seam import sim_tools

            return sim_tools(root, in_process=self.in_process)
        from .host.node import host_tools

        return host_tools(root)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(os.environ)
    from .config_paths import check_written_paths
    from .host.paths import NodePaths

    check_written_paths(NodePaths.at(args.root), config)  # before the debug trace is opened
    if config.entrypoint_debug:
        debug_file = open_debug_trace(args.root, config.debug_log_file)
        configure_logging(json=None if args.log_format == "auto" else args.log_format == "json",
                          level="debug", also=debug_file)
    get_logger("cli").info("config.loaded", root=str(args.root), **config.loggable())
    node = args.seams.node(args.root)
    try:
        if args.dry_run:
            from .lifecycle.dry_run import dry_run

            proceed, text = dry_run(node, config)
            print(text)
            return EXIT_OK if proceed else EXIT_FAILED  # 1: `run` would refuse the reload
        from .lifecycle.runner import run_lifecycle

        return run_lifecycle(node, config, once=args.once, die=args.seams.die)
    finally:
        node.close()


def open_debug_trace(root: Path, node_path: str) -> TextIO:
    """ENTRYPOINT_DEBUG: every log event, at debug level, also goes to DEBUG_LOG_FILE."""
    from .host.paths import NodePaths

    path = NodePaths.at(root).resolve(node_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", buffering=1)


def cmd_config(args: argparse.Namespace) -> int:
    from .config import markdown_table

    if args.markdown:
        print(markdown_table())
        return EXIT_OK
    config = load_config(os.environ, require_driver_version=not args.no_require_version)
    print(json.dumps(config.loggable(), indent=2))
    return EXIT_OK


def _quiet_logs(args: argparse.Namespace) -> None:
    """probe/status print their answer on stdout; the tools they run log only at warning+."""
    if args.log_level == "info":
        configure_logging(json={"auto": None, "json": True, "console": False}[args.log_format],
                          level="warning")


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import run_probe

    _quiet_logs(args)
    result = run_probe(args.which, args.seams.tools(args.root), load_config(os.environ,
                                                          require_driver_version=False),
                       args.max_age)
    print(result.line(args.which))
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from .status import format_status, gather

    _quiet_logs(args)
    st = gather(args.seams.tools(args.root), load_config(os.environ, require_driver_version=False))
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return EXIT_OK


def cmd_peermem(args: argparse.Namespace) -> int:
    from .peermem.loader import run_loader

    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g}: expected a number of seconds greater than 0")
    config = load_config(os.environ, require_driver_version=False)
    get_logger("cli").info("config.loaded", root=str(args.root), **config.loggable())
    return run_loader(args.seams.tools(args.root), config, once=args.once, timeout_s=args.timeout,
                      wait_gpu=args.wait_gpu_driver or config.peermem_wait_gpu_driver)


def cmd_sim(args: argparse.Namespace) -> int:
    from .sim import node, run
    from .sim.client import KernelClient, is_simulated

    if args.sim_command == "init":
        sc = node.init_node(args.scenario, args.root, force=args.force)
        nvf = sum(len(p.vfs) for p in sc.pfs)
        print(f"node {sc.name} ready at {args.root.resolve()}: {len(sc.pfs)} PF(s), {nvf} VF(s), "
              f"driver {sc.loaded_version} loaded, {sc.installed_version} installed")
        return EXIT_OK
    if args.sim_command in ("state", "stop", "set-vf", "set") and not is_simulated(args.root):
        raise UsageError(f"{args.root} is not a simulated node (make one with `mofed-lifecycle "
                         "sim init SCENARIO --root DIR`)")
    if args.sim_command == "state":
        with KernelClient(args.root) as k:
            print(json.dumps(k.call("state"), indent=2))
        return EXIT_OK
    if args.sim_command == "stop":
        print("stopped" if node.stop_kernel(args.root) else "no kernel process was running")
        return EXIT_OK
    if args.sim_command in ("set-vf", "set"):
        from .sim.admin import AdminError, AdminRefused, set_node, set_vf

        try:
            done = (set_vf(args.root, args.pf_pci, args.vf_index, args.settings)
                    if args.sim_command == "set-vf" else set_node(args.root, args.what))
        except AdminError as e:
            raise UsageError(str(e)) from None
        except AdminRefused as e:
            print(f"mofed-lifecycle: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(done))
        return EXIT_OK
    result = run.run_scenario(args.scenario, root=args.root, keep=args.keep)
    print(run.format_timeline(result))
    if args.report:
        args.report.write_text(json.dumps(result.report, indent=2) + "\n")
        print(f"report written to {args.report}")
    if args.keep or args.root:
        print(f"node kept at {result.root}")
    return EXIT_OK if result.report["outcome"] == "ready" else EXIT_FAILED


def main(argv: list[str] | None = None, seams: Seams | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seams = seams or Seams()
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(json=fmt, level=args.log_level)
    from .sim.node import NodeExists
    from .sim.scenario import ScenarioError

    handlers = {"run": cmd_run, "peermem": cmd_peermem, "config": cmd_config, "sim": cmd_sim,
                "probe": cmd_probe, "status": cmd_status}
    try:
        return handlers[args.command](args)
    except (ConfigError, ScenarioError, NodeExists, UsageError) as e:
        msg = " ".join(str(e).split())  # one line, and a short one: a bad value is not echoed whole
        print(f"mofed-lifecycle: {msg[:500] + ' ...' if len(msg) > 500 else msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except (OSError, TimeoutError) as e:
        print(f"mofed-lifecycle: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
