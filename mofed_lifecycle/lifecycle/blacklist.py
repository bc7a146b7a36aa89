"""The host blacklist around a reload: written by us, removed by us, and nobody else's file touched.

The file at OFED_BLACKLIST_MODULES_FILE is ours only when it starts with our header. If an
operator keeps a file of their own there, it is saved beside the journal, our lines are added to
its content for the swap, and it is put back exactly as it was afterwards — never deleted. At
startup only a file with our header is cleaned up (a killed run's leftover); anything else is left
alone and reported.
"""

from __future__ import annotations

from pathlib import Path

from ..host.files import atomic_write_text, remove_file

HEADER = "# Written by mofed-lifecycle for the duration of a NIC driver reload, removed after\n"
SAVED_NAME = "blacklist-saved-user-file.conf"  # beside the journal


def blacklist_text(modules: tuple[str, ...], user_text: str = "") -> str:
    head = (HEADER + "# it. If you find it with no reload running, the reload was interrupted: "
            "delete this\n# file, or mlx5_core will not load at the next boot.\n")
    if user_text:
        head += (f"# The file that was here is saved as {SAVED_NAME} beside the mofed-lifecycle "
                 "journal and\n# is put back after the reload. Its content follows, then ours.\n"
                 + user_text + ("" if user_text.endswith("\n") else "\n"))
    return head + "".join(f"blacklist {m}\n" for m in modules)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None


def is_ours(text: str | None) -> bool:
    return text is not None and text.startswith(HEADER)


def write_blacklist(path: Path, modules: tuple[str, ...], journal_dir: Path) -> str | None:
    """Write ours; a user's file found there is saved first (returned: its path) and kept in."""
    current = _read(path)
    saved: Path | None = None
    user = ""
    if current is not None and not is_ours(current):
        saved = journal_dir / SAVED_NAME
        atomic_write_text(saved, current)
        user = current
    elif current is not None and (journal_dir / SAVED_NAME).exists():  # ours, over a saved one
        user = _read(journal_dir / SAVED_NAME) or ""
        saved = journal_dir / SAVED_NAME
    atomic_write_text(path, blacklist_text(modules, user))
    return str(saved) if saved else None


def remove_blacklist(path: Path, journal_dir: Path) -> str:
    """Take ours away: put a saved user file back, else remove the file. Returns what was done:
    "restored", "removed", "absent" or "not ours" (left alone)."""
    current = _read(path)
    saved = journal_dir / SAVED_NAME
    if current is not None and not is_ours(current):
        return "not ours"
    user = _read(saved)
    if user is not None:
        atomic_write_text(path, user)
        remove_file(saved)
        return "restored"
    return "removed" if remove_file(path) else "absent"
