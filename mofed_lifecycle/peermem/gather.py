"""The peermem loader's reads of the node: marker, blacklist, modules, kallsyms, the .ko. Read-only.

Files are read through `NodePaths` (so `--root` works); `modinfo` and `modprobe --dump-modversions`
run through the node's `Commands` with a timeout. The decisions on what is read live in `checks.py`.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..host.commands import Commands
from ..host.headers_mount import headers_target
from ..host.modules import loaded_srcversions
from ..host.paths import NodePaths
from .checks import (
    MODPROBE_NAME,
    MODULE,
    STACK,
    KoFacts,
    Marker,
    parse_kallsyms,
    parse_modversions,
    parse_symvers,
)

TOOL_TIMEOUT_S = 30.0


def read_marker(path: Path) -> Marker | None:
    """The marker at `path`, or None when absent. A non-JSON marker (a legacy driver container's
    empty file) promises no srcversions."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw) if raw.strip() else None
    except ValueError:
        doc = None
    srcversions = None
    version = None
    if isinstance(doc, dict):
        sv = doc.get("srcversions")
        if isinstance(sv, dict):
            srcversions = {str(k): str(v) for k, v in sv.items() if v}
        version = doc.get("driver_version")
    return Marker(st.st_mtime_ns, st.st_ino, srcversions, str(version) if version else None)


@dataclass(frozen=True)
class PeermemState:
    loaded: bool
    refcnt: int


def peermem_state(paths: NodePaths) -> PeermemState:
    d = paths.module(MODULE)
    if not d.is_dir():
        return PeermemState(False, 0)
    try:
        refcnt = int((d / "refcnt").read_text().strip() or 0)
    except (OSError, ValueError):
        refcnt = 0
    return PeermemState(True, refcnt)


def stack_srcversions(paths: NodePaths) -> dict[str, str | None]:
    return loaded_srcversions(paths, STACK)


def exporters(paths: NodePaths) -> dict[str, str]:
    """Peer symbol -> exporting module, from /proc/kallsyms ({} when unreadable)."""
    try:
        return parse_kallsyms((paths.proc / "kallsyms").read_text(errors="replace"))
    except OSError:
        return {}


def kernel_release(paths: NodePaths) -> str:
    try:
        return paths.kernel_release.read_text().strip()
    except OSError:
        return platform.release()


def symvers(paths: NodePaths, config: Config, kernel: str) -> tuple[dict[str, str] | None,
                                                                    str | None]:
    """The peer symbols' CRCs in the NIC driver's `ofa_kernel/<arch>/<kernel>/Module.symvers`
    as the NIC driver container shares them (MLX_DRIVERS_MOUNT + SHARED_KERNEL_HEADERS_DIR: the
    GPU side sees that mount) (this machine's arch first), and its node path."""
    target = headers_target(config.drivers_mount, config.shared_kernel_headers_dir)
    base = paths.resolve(target) / "ofa_kernel"
    found = sorted(base.glob(f"*/{kernel}/Module.symvers"),
                   key=lambda p: p.parent.parent.name != platform.machine())
    for path in found:
        try:
            return parse_symvers(path.read_text(errors="replace")), str(paths.node_path(path))
        except OSError:
            continue
    return None, None


def gpu_ready(paths: NodePaths, config: Config) -> tuple[bool, bool]:
    """(the GPU driver's marker is there, the nvidia module is loaded)."""
    return (paths.resolve(config.gpu_driver_ready_path).exists(), paths.module("nvidia").is_dir())


def _modinfo_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out.setdefault(key.strip(), value.strip())
    return out


class KoReader:
    """nvidia-peermem.ko's modinfo and modversions, re-read only when the file changed."""

    def __init__(self, paths: NodePaths, commands: Commands) -> None:
        self.paths, self.commands = paths, commands
        self._cached: tuple[tuple[int, int, int], KoFacts] | None = None
        self.local_path: Path | None = None  # the .ko as a local file (to watch its directory)

    def _stat(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> KoFacts:
        if (self._cached is not None and self.local_path is not None
                and self._stat(self.local_path) == self._cached[0]):
            return self._cached[1]
        try:
            r = self.commands.run(["modinfo", MODPROBE_NAME], timeout_s=TOOL_TIMEOUT_S,
                                  what="find nvidia-peermem.ko")
        except OSError as e:  # not started, or timed out (CommandTimeout is an OSError too)
            return KoFacts(None, error=f"modinfo: {e}")
        if not r.ok:
            return KoFacts(None, error=" ".join(r.stderr.split()) or f"modinfo exit {r.returncode}")
        info = _modinfo_fields(r.stdout)
        filename = info.get("filename")
        if not filename:
            return KoFacts(None, error="modinfo printed no filename")
        local = self.paths.resolve(filename) if filename.startswith("/") else Path(filename)
        key = self._stat(local)
        try:
            d = self.commands.run(["modprobe", "--dump-modversions", filename],
                                  timeout_s=TOOL_TIMEOUT_S,
                                  what="modversions of nvidia-peermem.ko")
        except OSError as e:
            return KoFacts(filename, info.get("vermagic"), None, f"modprobe: {e}")
        facts = KoFacts(filename, info.get("vermagic"),
                        parse_modversions(d.stdout) if d.ok else None,
                        None if d.ok else " ".join(d.stderr.split()))
        self.local_path = local
        if key is not None and facts.modversions is not None:
            self._cached = (key, facts)
        return facts


__all__ = ["KoReader", "PeermemState", "exporters", "gpu_ready", "kernel_release",
           "peermem_state", "read_marker", "stack_srcversions", "symvers"]
