"""Subprocesses: argument lists only, a timeout on every one, output captured into the log."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..log import get_logger

OUTPUT_LOG_LIMIT = 4000  # characters of stdout/stderr kept in one log event
PR_SET_PDEATHSIG = 1
try:  # loaded once here: a forked child must not dlopen
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the daemon dies, as every process of a restarted container
    (or a stopped unit's cgroup) does. A child left running would swap the driver under the next
    run's feet."""
    if _PRCTL is not None:  # elsewhere (not Linux/glibc) the child may outlive us
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandTimeout(TimeoutError):
    pass


def run_command(argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
                what: str | None = None) -> CommandResult:
    """Run `argv` (no shell) in its own process group; kill the group if it overruns."""
    log = get_logger("command")
    start = time.monotonic()
    log.debug("command.started", argv=list(argv), timeout_s=timeout_s, what=what)
    try:
        proc = subprocess.Popen(  # noqa: S603 - argument list, never a shell
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(env) if env is not None else None, start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only async-signal-safe work (prctl)
        )
    except OSError as e:
        log.error("command.not_started", argv=list(argv), error=e.strerror,
                  hint=f"is {argv[0]} installed and on PATH?")
        raise
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        log.error("command.timeout", argv=list(argv), timeout_s=timeout_s,
                  stdout=out[-OUTPUT_LOG_LIMIT:], stderr=err[-OUTPUT_LOG_LIMIT:])
        raise CommandTimeout(f"{' '.join(argv)} did not finish within {timeout_s:.0f}s") from None
    result = CommandResult(tuple(argv), proc.returncode, out, err,
                           round(time.monotonic() - start, 3))
    log.info("command.finished", argv=list(argv), rc=proc.returncode,
             duration_s=result.duration_s, stdout=out[-OUTPUT_LOG_LIMIT:],
             stderr=err[-OUTPUT_LOG_LIMIT:])
    return result
