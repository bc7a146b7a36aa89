"""Kernel modules on the node: the holder graph, srcversions, and modprobe. A thin adapter.

Reads go through `NodePaths` (`/proc/modules`, `/sys/module/<m>/...` under the root); the tools
(`modinfo`, `modprobe`) run through the node's `Commands` (on a real node: subprocesses, and PATH
decides whose tools they are). The decisions built on these
readings live in `lifecycle/decide.py` and `lifecycle/preflight.py`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..lifecycle.preflight import ModuleFacts
from ..log import get_logger
from .commands import CommandResult, Commands
from .paths import NodePaths

MODINFO_WORKERS = 4  # modinfo runs at once when the whole stack is compared

NOT_LOADED_MARK = "is not in kernel"  # kmod's `modprobe -r` of a module that is not loaded
RMMOD_NOT_LOADED_MARK = "is not currently loaded"  # kmod's `rmmod` of one that is not loaded
# Unloaded with `rmmod`, alone: `modprobe -r nvidia_peermem` would also take its now-unused
# dependency `nvidia` — the GPU driver — away.
UNLOAD_ALONE = frozenset({"nvidia_peermem"})


class ModuleCommandError(OSError):
    """modinfo/modprobe failed: the message has the command, its stderr and what to do next."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), returncode: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.argv, self.returncode, self.stderr = tuple(argv), returncode, stderr


def _canon(name: str) -> str:
    return name.replace("-", "_")


def parse_proc_modules(text: str) -> dict[str, ModuleFacts]:
    """`name size refcnt usedby, state addr [taints]` lines; used-by is `a,b,` or `-`."""
    out: dict[str, ModuleFacts] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            refcnt = int(parts[2])
        except ValueError:  # "-": a kernel without module unloading
            refcnt = 0
        used_by = parts[3] if len(parts) > 3 else "-"
        items = [u for u in used_by.split(",") if u and u != "-"]
        holders = tuple(_canon(u) for u in items if not u.startswith("["))
        name = _canon(parts[0])
        out[name] = ModuleFacts(name, refcnt, holders, permanent="[permanent]" in items)
    return out


def read_module_facts(paths: NodePaths) -> dict[str, ModuleFacts]:
    """Every loaded module, holders = /proc/modules' used-by ∪ /sys/module/<m>/holders/."""
    facts = parse_proc_modules(paths.proc_modules.read_text())
    for name, f in facts.items():
        try:
            extra = sorted(_canon(h) for h in os.listdir(paths.module(name) / "holders"))
        except OSError:  # no /sys/module/<m> (or no holders/): /proc/modules is all we have
            continue
        holders = tuple(dict.fromkeys((*f.holders, *extra)))
        facts[name] = ModuleFacts(name, f.refcnt, holders, f.permanent)
    return facts


def loaded_srcversions(paths: NodePaths, modules: Iterable[str]) -> dict[str, str | None]:
    """`/sys/module/<m>/srcversion` per module; None when absent (not loaded, or built in)."""
    out: dict[str, str | None] = {}
    for m in modules:
        try:
            out[m] = (paths.module(_canon(m)) / "srcversion").read_text().strip() or None
        except OSError:
            out[m] = None
    return out


def _run(argv: list[str], commands: Commands, timeout_s: float, what: str) -> CommandResult:
    """One command, with failures to start or to finish turned into ModuleCommandError."""
    try:
        return commands.run(argv, timeout_s=timeout_s, what=what)
    except TimeoutError:
        raise ModuleCommandError(
            f"{' '.join(argv)} did not finish within {timeout_s:g}s (killed): a module may be "
            "stuck loading or unloading; see `dmesg` and the process list, then retry",
            argv=argv) from None
    except OSError as e:
        raise ModuleCommandError(
            f"{' '.join(argv)} could not be started ({e.strerror or e}); is kmod installed and "
            f"{argv[0]} on PATH?", argv=argv) from None


def installed_srcversions(modules: Iterable[str], commands: Commands,
                          timeout: float | Callable[[str], float]) -> dict[str, str | None]:
    """`modinfo -F srcversion <m>` per module (a few at once); None on empty output or a non-zero
    exit (not installed, or an unversioned build). `timeout`: seconds per call, or a function
    giving the next call's (a step's shared budget: lifecycle/budget.ToolDeadline.timeout, which
    raises when the budget is spent)."""
    names = list(dict.fromkeys(modules))

    def one(m: str) -> str | None:
        argv = ["modinfo", "-F", "srcversion", m]
        t = timeout(" ".join(argv)) if callable(timeout) else timeout
        r = _run(argv, commands, t, f"srcversion of {m}")
        lines = r.stdout.strip().splitlines() if r.ok else []
        return lines[0].strip() if lines and lines[0].strip() else None

    with ThreadPoolExecutor(max_workers=MODINFO_WORKERS, thread_name_prefix="modinfo") as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def _failed(argv: list[str], r: CommandResult, next_step: str) -> ModuleCommandError:
    err = " ".join(r.stderr.split()) or "(no output on stderr)"
    return ModuleCommandError(f"{' '.join(argv)} failed (exit {r.returncode}): {err}; {next_step}",
                              argv=argv, returncode=r.returncode, stderr=r.stderr)


def modprobe(names: Iterable[str], commands: Commands, timeout_s: float,
             dirname: Path | None = None) -> None:
    """`modprobe <m>` for each module in turn; the first failure raises ModuleCommandError.
    `dirname`: load from that root's module tree (`modprobe -d /host`: the host's modules)."""
    for m in names:
        argv = ["modprobe", *(["-d", str(dirname)] if dirname else []), m]
        step = (f"see `dmesg` for the kernel's reason; check `modinfo {m}` shows the installed "
                "driver's module (same version as mlx5_core), then retry")
        r = _run(argv, commands, timeout_s, f"load {m}")
        if not r.ok:
            raise _failed(argv, r, step)


def modprobe_remove(names: Iterable[str], commands: Commands, timeout_s: float) -> None:
    """`modprobe -r <m>` (`rmmod` for UNLOAD_ALONE) for each module, in the order given (holders
    first).

    A module that is already gone (an earlier `modprobe -r` took it as an unused dependency) is
    fine; any other failure raises ModuleCommandError and leaves the rest loaded."""
    log = get_logger("modules")
    for m in names:
        argv = ["rmmod", m] if _canon(m) in UNLOAD_ALONE else ["modprobe", "-r", m]
        step = (f"something started using {m} after the preflight check: see `lsmod`, "
                f"/sys/module/{_canon(m)}/holders and its open devices, stop that user, then retry")
        r = _run(argv, commands, timeout_s, f"unload {m}")
        if r.ok:
            continue
        if NOT_LOADED_MARK in r.stderr or RMMOD_NOT_LOADED_MARK in r.stderr:
            log.info("module.already_unloaded", module=m, stderr=r.stderr.strip())
            continue
        raise _failed(argv, r, step)


__all__ = ["ModuleCommandError", "installed_srcversions", "loaded_srcversions", "modprobe",
           "modprobe_remove", "parse_proc_modules", "read_module_facts"]
