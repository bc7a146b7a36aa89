"""Stand-ins for the node's tools: modinfo, modprobe, rmmod, lsmod, openibd, mlnxofedctl, mount.

`sim init` writes one small executable per tool into `<root>/.sim/bin` (and `<root>/etc/init.d/
openibd`); the daemon runs them as ordinary subprocesses. They print what the real tools print and
exit with their codes; the kernel they act on is the node's kernel process. Standard library only.

`sim/inprocess.py` runs the same functions in the caller's process (a thread per call): what they
print goes to that call's own streams (`Streams`), and a call killed at its deadline stops at its
next wait (`pause`) without another request to the kernel, as a killed process would.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import tool_modinfo, tool_mstconfig
from .errors import SimKernelError

if TYPE_CHECKING:
    from .client import KernelClient

TOOLS = ("modinfo", "modprobe", "rmmod", "lsmod", "mlnxofedctl", "mount", "umount", "dpkg",
         "rpm", "depmod", "gcc", "make", "mstconfig")


class Killed(BaseException):
    """The in-process call was killed at its deadline (a subprocess would have got SIGKILL)."""


class Streams(threading.local):
    """The current call's output and kill switch: a subprocess's stdout/stderr by default."""

    out: TextIO | None = None
    err: TextIO | None = None
    killed: threading.Event | None = None


CALL = Streams()


def out() -> TextIO:
    return CALL.out or sys.stdout


def err() -> TextIO:
    return CALL.err or sys.stderr


def pause(seconds: float) -> None:
    """Wait as the real tool would (a module init, openibd's own duration); raises Killed as soon
    as the in-process call is killed."""
    if CALL.killed is None:
        time.sleep(seconds)  # sleep-ok: the simulated tool's own duration, in its own process
    elif CALL.killed.wait(seconds):
        raise Killed


def kernel(root: Path) -> KernelClient:
    """The node's kernel, imported on first use: `modinfo` reads module files only, and a
    stand-in's start-up is most of its cost (a run calls modinfo once per module)."""
    from .client import KernelClient

    return KernelClient(root)


def modinfo(root: Path, argv: list[str]) -> int:
    return tool_modinfo.modinfo(str(root), argv, out(), err())


def dump_modversions(root: Path, argv: list[str]) -> int:
    """`modprobe --dump-modversions FILE`: the CRC of every symbol the module imports."""
    files = [a for a in argv if not a.startswith("-")]
    if not files:
        print("modprobe: ERROR: missing filename.", file=err())
        return 1
    from .peermem_ko import read_modversions  # the scenario model: only this tool needs it

    path = root / files[0].lstrip("/") if files[0].startswith("/") else Path(files[0])
    try:
        crcs = read_modversions(path)
    except OSError as e:
        print(f"modprobe: FATAL: could not get modversions of {files[0]}: {e.strerror}",
              file=err())
        return 1
    for sym, crc in crcs.items():
        print(f"0x{int(crc, 16):08x}\t{sym}", file=out())
    return 0


def _host_tree(root: Path, dirname: str | None) -> bool:
    """`-d DIR`: the node's own modules (None, "/", the node root) or the host's (`/host`)."""
    if dirname in (None, "", "/") or Path(dirname).resolve() == root.resolve():
        return False
    if Path(dirname).resolve() == (root / "host").resolve() or dirname.rstrip("/") == "/host":
        return True
    raise SimKernelError(2, f"{dirname}/lib/modules: No such file or directory")


def modprobe(root: Path, argv: list[str]) -> int:
    if "--dump-modversions" in argv:
        return dump_modversions(root, argv)
    remove = quiet = blacklist = all_names = False
    names: list[str] = []
    dirname: str | None = None
    args = iter(argv)
    for a in args:
        if a in ("-d", "--dirname"):
            dirname = next(args, "")
        elif a.startswith("--dirname="):
            dirname = a.split("=", 1)[1]
        elif a in ("-r", "--remove"):
            remove = True
        elif a in ("-q", "--quiet"):
            quiet = True
        elif a in ("-b", "--use-blacklist"):
            blacklist = True
        elif a in ("-a", "--all"):
            all_names = True
        elif a.startswith("-"):
            continue
        elif "=" in a and names and not all_names:
            continue  # a module parameter: accepted and ignored by the simulator
        else:
            names.append(a)
    if not names:
        print("modprobe: ERROR: missing module name.", file=err())
        return 1
    if not (all_names or remove):
        names = names[:1]
    if any(n.startswith("pci:") for n in names):
        names, blacklist = ["mlx5_core"], True  # an alias: what udev asks for on hot-plug
    try:
        with kernel(root) as k:
            if remove:
                k.call("modprobe_remove", names=names)
            elif hanging := k.call("load_hangs", names=names):
                print(f"modprobe: {hanging[0]}: init blocks (scenario load_hangs)",
                      file=err(), flush=True)
                while True:  # until killed, as a module init that never returns
                    pause(3600)  # stands in for a blocked init_module(2)
            else:
                k.call("modprobe", names=names, blacklist=blacklist,
                       host_tree=_host_tree(root, dirname))
    except SimKernelError as e:
        if not quiet:
            level = "ERROR" if "insert" in (e.strerror or "") else "FATAL"
            print(f"modprobe: {level}: {e.strerror}", file=err())
        return 1
    return 0


def rmmod(root: Path, argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    rc = 0
    with kernel(root) as k:
        for n in names:
            try:
                k.call("rmmod", name=n)
            except SimKernelError as e:
                print(f"rmmod: ERROR: {e.strerror}", file=err())
                rc = 1
    return rc


def lsmod(root: Path, argv: list[str]) -> int:
    with kernel(root) as k:
        rows = k.call("lsmod")
    print(f"{'Module':<28}{'Size':>8}  Used by", file=out())
    for name, refcnt, holders in rows:
        print(f"{name:<28}{65536:>8}  {refcnt} {','.join(holders)}".rstrip(), file=out())
    return 0


def _restart(root: Path, alt: bool, who: str) -> int:
    with kernel(root) as k:
        try:
            info = k.call("openibd_stop")
        except SimKernelError as e:
            print(f"Unloading HCA driver:{'[FAILED]':>40}\n{e.strerror}", file=err())
            return 1
        print(f"Unloading HCA driver:{'[  OK  ]':>40}", file=out(), flush=True)
        # The swap takes the scenario's openibd_restart_s; killed here, the node keeps no driver.
        pause(info["duration_s"])
        try:
            k.call("openibd_start", alt=alt)
        except SimKernelError as e:
            print(f"Loading HCA driver and Access Layer:{'[FAILED]':>25}\n{e.strerror}",
                  file=err())
            return 1
    print(f"Loading HCA driver and Access Layer:{'[  OK  ]':>25}  ({who})", file=out())
    return 0


def openibd(root: Path, argv: list[str]) -> int:
    action = argv[0] if argv else ""
    if action in ("restart", "force-restart"):
        return _restart(root, alt=False, who="openibd")
    if action == "status":
        with kernel(root) as k:
            loaded = {row[0] for row in k.call("lsmod")}
        print("HCA driver loaded" if "mlx5_core" in loaded else "HCA driver is not loaded",
              file=out())
        return 0 if "mlx5_core" in loaded else 3
    print("Usage: openibd {restart|force-restart|status} (simulated)", file=err())
    return 2


def mlnxofedctl(root: Path, argv: list[str]) -> int:
    if "--alt-mods" in argv and "force-restart" in argv:
        return _restart(root, alt=True, who="mlnxofedctl --alt-mods")
    print("Usage: mlnxofedctl --alt-mods force-restart (simulated)", file=err())
    return 2


def _node_path(root: Path, path: str) -> str:
    """A path the daemon passed (under the node root) as the node sees it."""
    p = Path(path).resolve()
    try:
        return "/" + str(p.relative_to(root.resolve())).lstrip(".")
    except ValueError:
        return path


MOUNTINFO = "proc/self/mountinfo"


def mount(root: Path, argv: list[str]) -> int:
    """`mount --rbind SRC TARGET`: a simulated node mounts nothing; the bind is recorded in
    `.sim/mounts` (one "SRC TARGET" line each) and in `/proc/self/mountinfo` (node paths), so
    that a run can be checked for it and the daemon sees the mount point."""
    args = [a for a in argv if not a.startswith("-")]
    if "--rbind" not in argv or len(args) != 2:
        print("mount: the simulated node only knows `mount --rbind SRC TARGET`", file=err())
        return 1
    with (root / ".sim" / "mounts").open("a") as f:
        f.write(f"{args[0]} {args[1]}\n")
    info = root / MOUNTINFO
    info.parent.mkdir(parents=True, exist_ok=True)
    n = len(info.read_text().splitlines()) if info.exists() else 0
    with info.open("a") as f:
        f.write(f"{100 + n} 1 0:42 {_node_path(root, args[0])} {_node_path(root, args[1])} rw "
                "shared:1 - none none rw\n")
    return 0


def umount(root: Path, argv: list[str]) -> int:
    """`umount [-l] [-R] TARGET`: drop TARGET's mounts (and, -R, those below) from mountinfo."""
    args = [a for a in argv if not a.startswith("-")]
    if len(args) != 1:
        print("umount: the simulated node only knows `umount [-l] [-R] TARGET`", file=err())
        return 1
    target = _node_path(root, args[0])
    info = root / MOUNTINFO
    lines = info.read_text().splitlines() if info.exists() else []

    def under(f: list[str]) -> bool:
        return len(f) > 4 and (f[4] == target or ("-R" in argv and
                                                  f[4].startswith(target.rstrip("/") + "/")))

    kept = [line for line in lines if not under(line.split())]
    if len(kept) == len(lines):
        print(f"umount: {args[0]}: not mounted.", file=err())
        return 32
    info.write_text("".join(line + "\n" for line in kept))
    return 0


Tool = Callable[[Path, list[str]], int]


def packages(tool: str) -> Tool:
    def run(root: Path, argv: list[str]) -> int:
        from .build import install_packages

        return install_packages(root, tool, argv, out(), err())

    return run


def depmod(root: Path, argv: list[str]) -> int:
    print("depmod (simulated): modules.dep is the packages' own", file=out())
    return 0


def compiler(tool: str) -> Tool:
    def run(root: Path, argv: list[str]) -> int:
        print(f"{tool} (simulated) 12.2.0" if "--version" in argv else
              f"{tool} (simulated): nothing is compiled on a simulated node", file=out())
        return 0

    return run


def mstconfig(root: Path, argv: list[str]) -> int:
    return tool_mstconfig.mstconfig(str(root), argv, out(), err())


def install_pl(root: Path, argv: list[str]) -> int:
    from .build import install_pl as build
    from .scenario_parse import load_scenario

    sc = load_scenario(root / ".sim" / "scenario.toml")
    return build(root, sc, sys.argv[0], argv, out(), err(), pause)


def main(tool: str, root: str, argv: list[str] | None = None) -> int:
    fn: Tool = {"modinfo": modinfo, "modprobe": modprobe, "rmmod": rmmod, "lsmod": lsmod,
          "openibd": openibd, "mlnxofedctl": mlnxofedctl, "mount": mount, "umount": umount,
          "dpkg": packages("dpkg"), "rpm": packages("rpm"), "depmod": depmod,
          "gcc": compiler("gcc"), "make": compiler("make"), "install.pl": install_pl,
          "mstconfig": mstconfig}[tool]
    try:
        return fn(Path(root), sys.argv[1:] if argv is None else argv)
    except (OSError, TimeoutError) as e:
        print(f"{tool}: simulated node {root}: {e}", file=err())
        return 1
