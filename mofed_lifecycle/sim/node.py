"""`sim init`: materialise a scenario into a node root, and stop or remove a node again."""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import sys
import uuid
from pathlib import Path

from .build import build_env, render_build
from .client import PKG_PARENT, is_simulated
from .model import initial_state, save_state
from .scenario import Scenario
from .scenario_parse import load_scenario
from .tools import TOOLS
from .tree import Tree

NODE_ID = "node-id"
STOP_WAIT_S = 10.0  # a kernel process saves its state and exits well within this


class NodeExists(RuntimeError):
    pass


def tool_script(tool: str, root: Path) -> str:
    """The stand-in executable `sim init` writes for `tool` of the node at `root`."""
    return (
        # -IS: no site, no PYTHON* variables: the stand-in needs the standard library and this
        # package only, and starts in a third of the time (a run calls modinfo per module)
        f"#!{sys.executable} -IS\n"
        f"# Simulated `{tool}` of the node at {root} (written by `mofed-lifecycle sim init`).\n"
        "import sys\n"
        f"sys.path.insert(0, {PKG_PARENT!r})\n"
        + (f"from mofed_lifecycle.sim.tool_{tool} import main\n"
           f"sys.exit(main({str(root)!r}))\n" if tool in ("modinfo", "mstconfig") else
           "from mofed_lifecycle.sim.tools import main\n"
           f"sys.exit(main({tool!r}, {str(root)!r}))\n")
    )


def _install_tool(path: Path, tool: str, root: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tool_script(tool, root))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _serves(pid: int, root: Path) -> bool:
    """Whether process `pid` is the kernel process of the node at `root` (its command line)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    if "mofed_lifecycle.sim.server" not in argv or "--root" not in argv[:-1]:
        return False
    return Path(argv[argv.index("--root") + 1]).resolve() == Path(root).resolve()


def stop_kernel(root: Path, wait_s: float = STOP_WAIT_S) -> bool:
    """Stop the node's kernel process if one runs, and wait (up to `wait_s`) until it has exited:
    it saves its state as it stops, and a caller that deletes the node next must not race that
    write (rmtree would leave a `.sim/kernel.json` behind). True if one was stopped."""
    try:
        pid = int((root / ".sim" / "kernel.lock").read_text().split()[0])  # not "in-thread"
        exited = os.pidfd_open(pid)  # readable once the process has exited: no polling
    except (OSError, ValueError, IndexError):
        return False
    if not _serves(pid, root):  # a kernel long gone, its PID another process's by now
        os.close(exited)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        select.select([exited], [], [], wait_s)
    except OSError:
        return False
    finally:
        os.close(exited)
    return True


def init_node(scenario_path: str | Path, root: str | Path, *, force: bool = False) -> Scenario:
    """Build the node described by the scenario under `root` (empty, or a node when `force`)."""
    sc = load_scenario(scenario_path)
    root = Path(root).resolve()
    if root.exists() and not root.is_dir():
        raise NodeExists(f"{root} is a file: choose an empty or new directory")
    if root.exists() and any(root.iterdir()):
        if not (force and is_simulated(root)):
            hint = " (pass --force to rebuild it)" if is_simulated(root) else ""
            raise NodeExists(f"{root} is not empty{hint}: choose an empty or new directory")
        stop_kernel(root)
        shutil.rmtree(root)
    created = not root.exists()
    try:
        _build(sc, Path(scenario_path), root)
    except BaseException:  # never a half-built node: the directory as it was (absent or empty)
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return sc


def _build(sc: Scenario, scenario_path: Path, root: Path) -> None:
    simdir = root / ".sim"
    simdir.mkdir(parents=True)
    (simdir / "scenario.toml").write_text(Path(scenario_path).read_text())
    # this node's identity: a kernel process of a deleted node whose directory is rebuilt at the
    # same path (`--force`, even on the same inode) sees it change and exits
    (simdir / NODE_ID).write_text(uuid.uuid4().hex + "\n")
    st = initial_state(sc)
    Tree(root, sc).render_all(st)
    save_state(st, simdir / "kernel.json")
    for tool in TOOLS:
        _install_tool(simdir / "bin" / tool, tool, root)
    _install_tool(root / "etc/init.d/openibd", "openibd", root)
    render_build(root, sc, {**build_env(sc), **sc.env}, tool_script("install.pl", root))


def ensure_tools(root: Path) -> None:
    """Every stand-in tool present (a node made by an older `sim init` may lack one): a tool
    missing from `.sim/bin` would be found on the host's PATH and run for real (`mount`)."""
    simdir = Path(root) / ".sim"
    for tool in TOOLS:
        if not (simdir / "bin" / tool).is_file():
            _install_tool(simdir / "bin" / tool, tool, Path(root))


def tool_path(root: Path) -> str:
    """PATH with the node's stand-in tools first."""
    return os.pathsep.join([str(Path(root) / ".sim" / "bin"), os.environ.get("PATH", "")])
