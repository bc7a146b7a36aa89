"""The files and directories a configuration makes the daemon write, checked on the node before
anything is written: a path that cannot be what it must be (a directory where a file goes, a file
where a directory goes, or under a file) is a configuration error naming the variable (exit 2),
not an errno deep inside a step."""

from __future__ import annotations

from pathlib import Path

from .config import Config, ConfigError
from .host.paths import NodePaths

JOURNAL_DIR = "mofed-lifecycle"  # lifecycle/journal.py's directory under MLX_DRIVERS_MOUNT


def written_paths(config: Config) -> list[tuple[str, str, str, bool]]:
    """(variable, its value, node path, is a directory) for what `run` may create or replace."""
    mount = config.drivers_mount
    out = [("LOCK_FILE_PATH", config.lock_file_path, config.lock_file_path, False),
           ("DRIVER_READY_PATH", config.driver_ready_path, config.driver_ready_path, False),
           ("OFED_BLACKLIST_MODULES_FILE", config.blacklist_file, config.blacklist_file, False),
           ("MLX_DRIVERS_MOUNT", mount, mount, True),
           ("MLX_DRIVERS_MOUNT", mount, mount.rstrip("/") + "/" + JOURNAL_DIR, True)]
    if config.metrics_textfile:
        out.append(("METRICS_TEXTFILE", config.metrics_textfile, config.metrics_textfile, False))
    if config.entrypoint_debug:
        out.append(("DEBUG_LOG_FILE", config.debug_log_file, config.debug_log_file, False))
    return out


def _blocker(path: Path, root: Path) -> Path | None:
    """The first existing ancestor of `path` (below the root) that is not a directory."""
    for parent in reversed(path.parents):
        if parent == root or root not in parent.parents:
            continue
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_written_paths(paths: NodePaths, config: Config) -> None:
    """ConfigError (exit 2) naming the first variable whose path cannot be written."""
    for var, value, node_path, is_dir in written_paths(config):
        local = paths.resolve(node_path)
        shown = f"{var}={value!r}"
        if (blocker := _blocker(local, paths.root)) is not None:
            raise ConfigError(f"{shown}: {blocker} is a file, so nothing can be created under "
                              "it; point the variable elsewhere")
        if is_dir and local.exists() and not local.is_dir():
            raise ConfigError(f"{shown}: {local} is a file, not a directory; point it at a "
                              "directory")
        if not is_dir and (local.is_dir() or local == paths.root):
            raise ConfigError(f"{shown}: {local} is a directory; point it at a file (remove the "
                              "directory if it was created by mistake)")
