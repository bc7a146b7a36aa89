"""A simulated node's tools run in the caller's process: the last hop of the fast test node.

On a simulated node every tool the daemon runs (`modinfo`, `modprobe`, `openibd`, `mount`...) is a
stand-in that `sim init` wrote; run as a subprocess each costs a Python start. Here a command whose
executable is one of those stand-ins, byte for byte, runs as a call of `tools.main` on a thread of
this process, with its own stdout and stderr and its deadline; any other command (a test's own
script on PATH, a real tool) runs as a subprocess exactly as on a real node. Logged as the real
runner logs (`command.finished`, `command.timeout`).
"""

from __future__ import annotations

import io
import shutil
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..host.commands import CommandResult, Commands, log_finished, log_timeout
from ..log import get_logger
from . import tools
from .node import tool_script

KILL_WAIT_S = 2.0  # a killed call stops at its next wait: this long at most, then it is left


class InProcessCommands(Commands):
    def __init__(self, root: Path, env: Mapping[str, str]) -> None:
        super().__init__(env)
        self.root = Path(root).resolve()

    def stand_in(self, argv0: str) -> str | None:
        """The tool `argv0` names if it resolves to this node's stand-in, else None."""
        exe = argv0 if "/" in argv0 else shutil.which(argv0, path=self.env.get("PATH"))
        if exe is None:
            return None
        name = Path(exe).name
        if name not in (*tools.TOOLS, "openibd"):
            return None
        try:
            text = Path(exe).read_text()
        except (OSError, UnicodeDecodeError):
            return None
        return name if text == tool_script(name, self.root) else None

    def run(self, argv: Sequence[str], *, timeout_s: float,
            what: str | None = None) -> CommandResult:
        tool = self.stand_in(argv[0]) if argv else None
        if tool is None:
            return super().run(argv, timeout_s=timeout_s, what=what)
        get_logger("command").debug("command.started", argv=list(argv), timeout_s=timeout_s,
                                    what=what, in_process=True)
        out, err, killed = io.StringIO(), io.StringIO(), threading.Event()
        rc: list[int] = []

        def call() -> None:
            tools.CALL.out, tools.CALL.err, tools.CALL.killed = out, err, killed
            try:
                rc.append(tools.main(tool, str(self.root), list(argv[1:])))
            except tools.Killed:
                rc.append(-9)
            except Exception:  # a crashing tool exits 1 with its traceback, as a process would
                err.write(traceback.format_exc())
                rc.append(1)

        start = time.monotonic()
        t = threading.Thread(target=call, name=f"tool-{tool}", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            killed.set()
            t.join(KILL_WAIT_S)
            raise log_timeout(argv, timeout_s, out.getvalue(), err.getvalue())
        return log_finished(CommandResult(tuple(argv), rc[0], out.getvalue(), err.getvalue(),
                                          round(time.monotonic() - start, 3)))
