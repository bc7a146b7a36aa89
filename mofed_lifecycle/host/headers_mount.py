"""The kernel headers shared with the GPU side: `SHARED_KERNEL_HEADERS_DIR` (the source, /usr/src)
bind-mounted at `MLX_DRIVERS_MOUNT` + that path (/run/mellanox/drivers/usr/src), where the GPU
driver container builds nvidia-peermem against the NIC driver's ofa_kernel headers.

A mount found there at start is a killed predecessor's (its content may be another driver's
headers): it is unmounted and made again. On stop it is unmounted, so the host keeps no mount
into a container that is gone. Whether a path is a mount point is read from
`/proc/self/mountinfo` under the node root (the daemon's own mount namespace).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ..log import get_logger
from .commands import Commands, CommandTimeout
from .paths import NodePaths


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\040 \\011 \\012 \\134."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_points(paths: NodePaths) -> list[str]:
    """Every mount point of this mount namespace (node paths), in mount order."""
    try:
        text = paths.resolve("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    return [_unescape(f[4]) for f in (line.split() for line in text.splitlines()) if len(f) > 4]


def headers_target(drivers_mount: str, source: str) -> str:
    """The node path the headers are mounted at: MLX_DRIVERS_MOUNT + SHARED_KERNEL_HEADERS_DIR."""
    return str(PurePosixPath(drivers_mount) / PurePosixPath(source).relative_to("/"))


class HeadersMount:
    def __init__(self, paths: NodePaths, commands: Commands, *, drivers_mount: str,
                 source: str, timeout_s: float) -> None:
        self.paths, self.commands, self.timeout_s = paths, commands, timeout_s
        self.source = source
        self.target = headers_target(drivers_mount, source)
        self.log = get_logger("headers")

    @property
    def local_target(self) -> Path:
        return self.paths.resolve(self.target)

    def mounted(self) -> int:
        """How many mounts are stacked at the target (a bind made twice counts twice)."""
        return mount_points(self.paths).count(self.target)

    def unmount(self, why: str) -> bool:
        """Unmount every mount at the target (lazily, recursively); True if none is left."""
        n = self.mounted()
        if n == 0:
            return True
        try:
            res = self.commands.run(["umount", "-l", "-R", str(self.local_target)],
                                    timeout_s=self.timeout_s, what="unmount the shared headers")
        except (OSError, CommandTimeout) as e:
            self.log.error("headers.unmount_failed", target=self.target, error=str(e),
                           next=f"unmount it by hand: umount -l -R {self.target}")
            return False
        left = self.mounted()
        if res.ok and left == 0:
            self.log.info("headers.unmounted", target=self.target, mounts=n, why=why)
            return True
        self.log.error("headers.unmount_failed", target=self.target, rc=res.returncode,
                       stderr=res.stderr.strip(), left=left,
                       next=f"unmount it by hand: umount -l -R {self.target}")
        return False

    def mount(self, *, mounted_by_us: bool) -> bool:
        """Share the headers: a mount already there not made by this process is made again."""
        if self.mounted() and mounted_by_us:
            return True
        if self.mounted():
            self.unmount("stale: made by a previous run, its content may be another driver's")
        source = self.paths.resolve(self.source)
        if not source.is_dir():
            self.log.error("headers.source_missing", source=self.source,
                           next="nvidia-peermem cannot be built on this node: the driver "
                                f"image has no {self.source} (SHARED_KERNEL_HEADERS_DIR)")
            return False
        self.local_target.mkdir(parents=True, exist_ok=True)
        try:
            res = self.commands.run(["mount", "--rbind", str(source), str(self.local_target)],
                                    timeout_s=self.timeout_s,
                                    what="share the kernel headers with the GPU side")
            ok, err = res.ok, res.stderr.strip()
        except (OSError, CommandTimeout) as e:
            ok, err = False, str(e)
        if not ok:
            self.log.error("headers.mount_failed", target=self.target, stderr=err,
                           next="nvidia-peermem cannot be built on this node until "
                                f"{self.source} is shared at {self.target}")
            return False
        self.log.info("headers.mounted", source=self.source, target=self.target)
        return True
