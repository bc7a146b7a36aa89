"""`mofed-lifecycle ARGV` run in the test's own process, on a simulated node whose tools run as
calls (`cli.Seams(in_process=True)`): the whole daemon code path from argument parsing to exit code,
without a Python start per command. Returns what `subprocess.run` would (returncode, stdout,
stderr), so a test reads the same log lines either way.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator, Mapping

from mofed_lifecycle.cli import Seams, main
from mofed_lifecycle.lifecycle.runner import Crashed

KILLED = -9  # what subprocess reports for a process killed by SIGKILL


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ is exactly `env` inside (the daemon reads its configuration from it)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_cli(argv: list[str], env: Mapping[str, str] | None = None, *,
            environ: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`env`: variables added to this process's environment; `environ`: the whole environment."""
    out, err = io.StringIO(), io.StringIO()
    full = dict(environ) if environ is not None else {**os.environ, **(env or {})}
    with environment(full), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(list(argv), Seams(in_process=True))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        except Crashed:  # MOFED_LIFECYCLE_CRASH_AT: stopped dead where a SIGKILL would have
            code = KILLED
    return subprocess.CompletedProcess(["mofed-lifecycle", *argv], code, out.getvalue(),
                                       err.getvalue())
