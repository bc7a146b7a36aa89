"""`mofed-lifecycle sim ...`: the simulated node's commands (parser and handler), wired into the
CLI by cli.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_common import EXIT_FAILED, EXIT_OK, UsageError, _root


def add_sim_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
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
    from .admin import SET_ACTIONS

    ss = ssub.add_parser(
        "set", help="change the node as an operator or a failure would (modules, route, firmware)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Change the node at DIR at once, between or during runs. WHAT is one of:\n"
                    + "".join(f"  {w + ' ' + a:<34} {d}\n" for w, (a, d) in SET_ACTIONS.items())
                    + "Example: sim set --root DIR module-unload nvme_rdma")
    ss.add_argument("--root", required=True, type=_root)
    ss.add_argument("what", metavar="WHAT", nargs="+")


def cmd_sim(args: argparse.Namespace) -> int:
    from . import node, run
    from .client import KernelClient, is_simulated

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
        from .admin import AdminError, AdminRefused, set_node, set_vf

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
