"""What the CLI's modules share: exit codes, the usage error, the --root argument type.

Its own module, so that `python -m mofed_lifecycle.cli` (where cli.py is `__main__`) and the
subcommand modules raise and catch the same UsageError class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit 2."""


def _root(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"--root {value!r} is not a directory")
    return p.resolve()
