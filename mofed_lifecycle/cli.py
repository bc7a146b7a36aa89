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
from .cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, _root
from .config import ConfigError, load_config
from .log import configure_logging, get_logger

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .config import Config
    from .host.node import Node, Tools
    from .provision.plan import Mode


EPILOG = """\
exit codes:
  0  ok
  1  failed: the node could not be brought where it should be (the log says why and what next)
  2  bad usage or bad configuration: a wrong flag, environment variable or scenario file

Every host path is read under --root (default /): point it at a directory made by
`mofed-lifecycle sim init` to run against a simulated node. See `mofed-lifecycle sim --help`.
"""




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
    run.add_argument("mode", nargs="?", choices=("precompiled", "sources"), default="precompiled",
                     help="precompiled (default): the driver is in the image; sources: build it "
                          "from NVIDIA_NIC_DRIVER_PATH with install.pl, through the build cache "
                          "(NVIDIA_NIC_DRIVERS_INVENTORY_PATH), or by the OpenShift DTK sidecar "
                          "with DTK_OCP_DRIVER_BUILD=true")
    run.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")
    run.add_argument("--once", action="store_true", help="exit 0 once ready instead of staying up")
    run.add_argument("--dry-run", action="store_true",
                     help="print the decision and the plan, change nothing; exit 1 if the "
                          "reload would be refused")

    dtk = sub.add_parser(
        "dtk-build", formatter_class=fmt, epilog=EPILOG,
        help="OpenShift driver-toolkit sidecar: build the driver the main container hands over",
        description="Watch <DTK_OCP_NIC_SHARED_DIR>/<sanitised kernel>/ for dtk_start_compile "
                    "(inotify), build the sources\nthere with install.pl, write "
                    "dtk_done_compile_<version>, stay up until SIGTERM (which also stops\na "
                    "build). Heartbeat (dtk_heartbeat.json) every HEARTBEAT_INTERVAL_SEC; the "
                    "main container\n(`run sources` with DTK_OCP_DRIVER_BUILD=true) reports a "
                    "sidecar that died or hangs.",
    )
    dtk.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")

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

    doc = sub.add_parser(
        "doctor", formatter_class=fmt,
        help="name every known node misconfiguration (read-only): IOMMU, firmware, RDMA config",
        description="Read-only checks of what broke RDMA in the field, each a finding with a "
                    "stable id, a severity,\nthe evidence read (file and value) and the exact "
                    "fix: IOMMU translated with GPUs, firmware\nNUM_OF_VFS/SRIOV_EN pending a cold "
                    "boot, a bad RDMA shared device plugin config, modules that\nwould refuse a "
                    "reload, nvidia_peermem in use, a blacklist or headers mount left behind, a\n"
                    "stale marker, the inbox driver loaded, the management uplink on a PF a reload "
                    "takes down.\nExit 0: no finding; 1: findings (listed); 2: bad usage.",
        epilog="examples:\n  mofed-lifecycle doctor\n  mofed-lifecycle doctor --json "
               "--rdma-config /etc/rdma-dp/config.json | jq '.findings[].id'\n",
    )
    doc.add_argument("--root", type=_root, default=Path("/"), help="node root (default /)")
    doc.add_argument("--json", action="store_true",
                     help='print {"findings": [{"id", "severity", "subject", "evidence", "fix"}]}')
    doc.add_argument("--rdma-config", type=Path, metavar="FILE",
                     help="also check this RDMA shared device plugin config.json")

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

    from .sim.cli import add_sim_parser

    add_sim_parser(sub)
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
    log = get_logger("cli")
    log.info("config.loaded", root=str(args.root), mode=args.mode, **config.loggable())
    mode = check_mode(args.mode, config, os.environ)
    node = args.seams.node(args.root)
    try:
        if args.dry_run:
            from .lifecycle.dry_run import dry_run

            proceed, text = dry_run(node, config, mode)
            print(text)
            return EXIT_OK if proceed else EXIT_FAILED  # 1: `run` would refuse the reload
        from .lifecycle.runner import run_lifecycle

        return run_lifecycle(node, config, once=args.once, die=args.seams.die, mode=mode)
    finally:
        node.close()


BUILD_VARIABLES = ("NVIDIA_NIC_DRIVER_PATH", "NVIDIA_NIC_DRIVERS_INVENTORY_PATH",
                   "DTK_OCP_DRIVER_BUILD", "APPEND_DRIVER_BUILD_FLAGS")


def check_mode(name: str, config: Config, env: Mapping[str, str]) -> Mode:
    """The image's mode against the variables: `sources` needs its source tree; in
    `precompiled` the build variables are said (once) to have no effect."""
    from .provision.plan import Mode

    log = get_logger("cli")
    mode = Mode(name)
    if mode is Mode.SOURCES and not config.driver_path:
        raise UsageError("`run sources` needs NVIDIA_NIC_DRIVER_PATH: the driver's source tree "
                         "(the directory holding install.pl), e.g. /root/MLNX_OFED_SRC-"
                         f"{config.driver_version or '25.07-0.9.7'}")
    if mode is Mode.PRECOMPILED:
        set_here = [v for v in BUILD_VARIABLES if env.get(v, "").strip() not in ("", "false")]
        if set_here:
            log.warning("config.not_applicable", variables=set_here, mode=name,
                        why="the driver is in the image: nothing is built",
                        next="use `run sources` to build it (the image's command)")
    if env.get("BIND_DELAY_SEC", "").strip():
        log.info("config.no_effect", variable="BIND_DELAY_SEC",
                 why="VF binds wait for each probe and udev event, never a fixed sleep")
    return mode


def cmd_dtk_build(args: argparse.Namespace) -> int:
    from .provision.sidecar import run_sidecar

    tools = args.seams.tools(args.root)
    return run_sidecar(tools.paths, os.environ, tools.commands)


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


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor.findings import diagnose, format_findings
    from .doctor.gather import gather

    _quiet_logs(args)
    if args.rdma_config is not None and not args.rdma_config.is_file():
        raise UsageError(f"--rdma-config {args.rdma_config}: no such file")
    findings = diagnose(gather(args.seams.tools(args.root),
                               load_config(os.environ, require_driver_version=False),
                               args.rdma_config))
    print(json.dumps({"findings": [f.to_json() for f in findings]}, indent=2) if args.json
          else format_findings(findings))
    return EXIT_FAILED if findings else EXIT_OK


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


def main(argv: list[str] | None = None, seams: Seams | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seams = seams or Seams()
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(json=fmt, level=args.log_level)
    from .sim.cli import cmd_sim
    from .sim.node import NodeExists
    from .sim.scenario import ScenarioError

    handlers = {"run": cmd_run, "peermem": cmd_peermem, "config": cmd_config, "sim": cmd_sim,
                "probe": cmd_probe, "status": cmd_status, "dtk-build": cmd_dtk_build,
                "doctor": cmd_doctor}
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
