"""Subprocesses: argument lists only, a timeout on every one, output captured into the log."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


def _dies_with(parent: int) -> Callable[[], None]:
    """`_die_with_parent`, and if the parent died between fork and prctl (the signal then never
    comes: the child is already an orphan) the child exits at once instead of running."""
    def preexec() -> None:
        _die_with_parent()
        if os.getppid() != parent:
            os._exit(127)

    return preexec


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
            preexec_fn=_dies_with(os.getpid()),  # noqa: PLW1509 - async-signal-safe work only
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

    def run_logged(self, argv: Sequence[str], *, log_path: Path, timeout_s: float,
                   stop: threading.Event, progress_s: float, what: str,
                   cwd: Path | None = None, env: Mapping[str, str] | None = None) -> int:
        """A long command (a driver build): its output goes to `log_path` (kept), a progress
        line is logged every `progress_s` with the log's last line, `stop` (SIGTERM) kills it.
        Returns its exit code; CommandTimeout at `timeout_s`, CommandStopped on `stop`."""
        return run_logged(argv, log_path=log_path, timeout_s=timeout_s, stop=stop,
                          progress_s=progress_s, what=what, cwd=cwd,
                          env={**self.env, **(env or {})})


class CommandStopped(RuntimeError):
    """A long command was stopped (and killed) because the daemon is stopping."""


TERM_GRACE_S = 5.0  # a stopped build gets SIGTERM, then SIGKILL after this
STOP_TICK_S = 0.05  # how soon a finished build is seen


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][-200:] if lines else ""


def _end_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # what is left of the group (make's children)
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=DRAIN_S)


def run_logged(argv: Sequence[str], *, log_path: Path, timeout_s: float, stop: threading.Event,
               progress_s: float, what: str, cwd: Path | None = None,
               env: Mapping[str, str] | None = None) -> int:
    """See `Commands.run_logged`."""
    log = get_logger("command")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    log.info("command.started", argv=list(argv), timeout_s=timeout_s, what=what,
             output=str(log_path))
    with log_path.open("wb") as out:
        try:
            proc = subprocess.Popen(  # noqa: S603 - argument list, never a shell
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=dict(env) if env is not None else None, start_new_session=True,
                preexec_fn=_dies_with(os.getpid()),  # noqa: PLW1509 - async-signal-safe work only
            )
        except OSError as e:
            log.error("command.not_started", argv=list(argv), error=e.strerror,
                      hint=f"is {argv[0]} there and executable?")
            raise
    deadline, next_progress = start + timeout_s, start + progress_s
    while proc.poll() is None:
        now = time.monotonic()
        if now >= deadline:
            _end_group(proc, 0.0)
            log.error("command.timeout", argv=list(argv), timeout_s=timeout_s,
                      output=str(log_path), last_line=_last_line(log_path))
            raise CommandTimeout(f"{what}: {' '.join(argv[:1])} did not finish within "
                                 f"{timeout_s:g}s")
        if now >= next_progress:
            next_progress += progress_s
            log.info("command.progress", what=what, elapsed_s=round(now - start, 1),
                     last_line=_last_line(log_path), output=str(log_path))
        # the stop request is an event; the process's exit is looked at every STOP_TICK_S
        if stop.wait(min(STOP_TICK_S, deadline - now, next_progress - now)):
            _end_group(proc, TERM_GRACE_S)
            log.warning("command.stopped", argv=list(argv), what=what,
                        elapsed_s=round(time.monotonic() - start, 3), output=str(log_path))
            raise CommandStopped(f"{what}: stopped after {time.monotonic() - start:.1f}s")
    rc = proc.returncode
    log.info("command.finished", argv=list(argv), rc=rc,
             duration_s=round(time.monotonic() - start, 3), output=str(log_path),
             last_line=_last_line(log_path))
    return rc
