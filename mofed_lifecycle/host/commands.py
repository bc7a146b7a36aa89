"""Subprocesses: argument lists only, a timeout on every one, output captured into the log."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from ..log import get_logger

OUTPUT_LOG_LIMIT = 4000  # characters of stdout/stderr kept in one log event
PR_SET_PDEATHSIG = 1
_PRCTL: Any
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


DRAIN_S = 2.0  # after the command exits (or is killed): how long its output may still be read


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            sink.append(chunk)


def run_command(argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
                what: str | None = None) -> CommandResult:
    """Run `argv` (no shell) in its own process group; kill the group if it overruns.

    Success is judged from the command's own exit, not from the end of its output: a child it
    leaves behind holding stdout (openibd starting a helper) neither makes a finished command
    look timed out nor keeps us waiting; its output is read for DRAIN_S more, then left."""
    log = get_logger("command")
    start = time.monotonic()
    log.debug("command.started", argv=list(argv), timeout_s=timeout_s, what=what)
    try:
        proc = subprocess.Popen(  # noqa: S603 - argument list, never a shell
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None, start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only async-signal-safe work (prctl)
        )
    except OSError as e:
        log.error("command.not_started", argv=list(argv), error=e.strerror,
                  hint=f"is {argv[0]} installed and on PATH?")
        raise
    chunks: tuple[list[bytes], list[bytes]] = ([], [])
    readers = [threading.Thread(target=_drain, args=(stream, sink), daemon=True,
                                name=f"output-{proc.pid}")
               for stream, sink in ((proc.stdout, chunks[0]), (proc.stderr, chunks[1]))]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:  # a process in uninterruptible sleep (a module init inside init_module(2)) does not
            proc.wait(timeout=DRAIN_S)  # die on SIGKILL: it is left, named, never waited for
        except subprocess.TimeoutExpired:
            log.error("command.unkillable", argv=list(argv), pid=proc.pid,
                      next="it is stuck in the kernel (state D in `ps`); see `cat /proc/"
                           f"{proc.pid}/stack` and dmesg; a reboot may be needed to clear it")
    drained_by = time.monotonic() + DRAIN_S  # a child outside the group may keep a pipe open
    for t in readers:
        t.join(timeout=max(0.0, drained_by - time.monotonic()))
    out, err = (b"".join(c).decode(errors="replace") for c in chunks)
    if timed_out:
        raise log_timeout(argv, timeout_s, out, err)
    result = CommandResult(tuple(argv), proc.returncode, out, err,
                           round(time.monotonic() - start, 3))
    return log_finished(result)


def log_finished(result: CommandResult) -> CommandResult:
    """The one log event of a command that ran to its end (any runner of the node's tools)."""
    get_logger("command").info(
        "command.finished", argv=list(result.argv), rc=result.returncode,
        duration_s=result.duration_s, stdout=result.stdout[-OUTPUT_LOG_LIMIT:],
        stderr=result.stderr[-OUTPUT_LOG_LIMIT:])
    return result


def log_timeout(argv: Sequence[str], timeout_s: float, out: str, err: str) -> CommandTimeout:
    """Log a command killed at its deadline; the exception to raise for it."""
    get_logger("command").error("command.timeout", argv=list(argv), timeout_s=timeout_s,
                                stdout=out[-OUTPUT_LOG_LIMIT:], stderr=err[-OUTPUT_LOG_LIMIT:])
    return CommandTimeout(f"{' '.join(argv)} did not finish within {timeout_s:g}s")


class Commands:
    """How a node's tools are run (`modinfo`, `modprobe`, `openibd`, `mount`...): the seam every
    command of the daemon goes through. This one, a real node's, runs them as subprocesses with
    `env` (whose PATH decides which tools they are); a test node may run stand-ins in-process."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env: Mapping[str, str] = dict(env)

    def run(self, argv: Sequence[str], *, timeout_s: float,
            what: str | None = None) -> CommandResult:
        """Run `argv` under `timeout_s`; CommandTimeout when it overran (killed), OSError when it
        could not be started. Logged as `command.finished` / `command.timeout`."""
        return run_command(argv, timeout_s=timeout_s, env=self.env, what=what)
