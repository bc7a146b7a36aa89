"""The simulated node's nvidia-peermem build: its `.ko` stand-in with modversions, and the
`Module.symvers` of the installed driver under the drivers mount.

Modversions model the real thing closely enough to fail the same way: every vendor driver version
exports the peer-memory API with its own CRCs (derived from the version, stable), a module records
the CRCs of the symbols it imports as they were when it was built, and the kernel refuses it
(EINVAL, "disagrees about version of symbol") when they differ from the loaded exporter's.
A stub (built with no ofa_kernel headers visible) imports no peer symbol at all; its init returns
-EINVAL. Standard library only: the stand-in tools import this.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .scenario import INBOX, PEER_SYMBOLS, Scenario, peer_exporter

PEERMEM_KO_REL = "updates/nvidia_peermem.ko"  # under lib/modules/<kernel>/
OTHER_IMPORTS = ("module_layout", "ib_register_client", "ib_unregister_client")
ARCHES = ("x86_64", "aarch64", "ppc64le", "s390x")


def peer_crc(version: str, symbol: str) -> str:
    """The CRC a driver version's build gives an exported symbol (0x + 8 hex digits)."""
    return "0x" + hashlib.sha256(f"crc/{version}/{symbol}".encode()).hexdigest()[:8]


def kernel_arch(kernel: str) -> str:
    """`uname -m` of a kernel release string (x86_64 when it does not say)."""
    return next((a for a in ARCHES if a in kernel), "x86_64")


def symvers_rel(sc: Scenario) -> str:
    """Module.symvers of the installed driver as shared by the lifecycle (SHARED_KERNEL_HEADERS_DIR
    default), relative to the node root."""
    return f"run/mellanox/drivers/usr/src/ofa_kernel/{kernel_arch(sc.kernel)}/{sc.kernel}/" \
           "Module.symvers"


def built_against(sc: Scenario, kind: str) -> str | None:
    """The driver version a `.ko` of this kind was built against (None: a stub)."""
    if kind == "stub":
        return None
    if kind == "stale":
        prev = sc.loaded_version
        return prev if prev != sc.installed_version else f"{prev}~previous-build"
    return sc.installed_version


def ko_text(sc: Scenario, kind: str) -> str:
    """The `.ko` stand-in: modinfo fields plus one `modversion=CRC SYMBOL` line per import."""
    version = built_against(sc, kind)
    lines = [
        "# simulated kernel module: read by the simulated modinfo/modprobe and kernel",
        "name=nvidia_peermem",
        f"filename=/lib/modules/{sc.kernel}/{PEERMEM_KO_REL}",
        f"srcversion={hashlib.sha256(f'peermem/{kind}'.encode()).hexdigest()[:23].upper()}",
        "depends=" + ("" if version is None else "ib_core,ib_uverbs"),
        f"vermagic={sc.kernel} SMP preempt mod_unload modversions",
        "version=580.95.05",
        f"built_against={version or 'none (stub: no ofa_kernel headers)'}",
    ]
    lines += [f"modversion={peer_crc('linux', s)} {s}" for s in OTHER_IMPORTS]
    if version is not None:
        lines += [f"modversion={peer_crc(version, s)} {s}" for s in PEER_SYMBOLS]
    return "\n".join(lines) + "\n"


def symvers_text(version: str) -> str:
    """Module.symvers of a driver build: `CRC<TAB>symbol<TAB>module<TAB>export` lines."""
    exporter = peer_exporter(version) or "ib_core"
    rows = [(peer_crc("linux", s), s, "drivers/infiniband/core/ib_core")
            for s in OTHER_IMPORTS[1:]]
    rows += [(peer_crc(version, s), s, f"drivers/infiniband/core/{exporter}")
             for s in PEER_SYMBOLS]
    return "".join(f"{c}\t{s}\t{m}\tEXPORT_SYMBOL\t\n" for c, s, m in rows)


def render_peermem_files(root: Path, sc: Scenario) -> None:
    """At init (and never over a file already there: a test may have put a new build in place)."""
    if sc.installed_version != INBOX:
        symvers = root / symvers_rel(sc)
        if not symvers.exists():
            symvers.parent.mkdir(parents=True, exist_ok=True)
            symvers.write_text(symvers_text(sc.installed_version))
    if sc.gpu is not None:
        ko = root / "lib/modules" / sc.kernel / PEERMEM_KO_REL
        if not ko.exists():
            ko.parent.mkdir(parents=True, exist_ok=True)
            ko.write_text(ko_text(sc, sc.gpu.peermem_ko))


def read_modversions(path: Path | str) -> dict[str, str]:
    """symbol -> CRC of a `.ko` stand-in (what `modprobe --dump-modversions` prints)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^modversion=(0x[0-9a-f]+)\s+(\S+)$", line.strip())
        if m:
            out[m.group(2)] = m.group(1)
    return out


def find_peermem_ko(root: Path, kernel: str) -> Path | None:
    path = root / "lib/modules" / kernel / PEERMEM_KO_REL
    return path if os.path.isfile(path) else None


__all__ = ["PEERMEM_KO_REL", "built_against", "find_peermem_ko", "ko_text", "peer_crc",
           "read_modversions", "render_peermem_files", "symvers_rel", "symvers_text"]
