"""`run sources`: build the driver here with its own install.pl (headers and compiler are the
image's job: checked first, and named precisely when missing)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from ..host.commands import Commands, CommandTimeout
from ..host.files import read_text_or_empty
from ..host.paths import NodePaths
from ..log import get_logger
from .inventory import ProvisionError, find_packages
from .plan import install_args, rhel_distro, tail

BUILD_TOOLS = ("gcc", "make")


def missing_prerequisites(paths: NodePaths, source: Path, kernel: str,
                          commands: Commands) -> list[str]:
    """What a build of `source` for `kernel` would lack, each said with how to provide it."""
    missing: list[str] = []
    install_pl = source / "install.pl"
    if not install_pl.is_file():
        missing.append(f"the driver sources: no install.pl in {source} (NVIDIA_NIC_DRIVER_PATH "
                       "must be the unpacked driver source tree)")
    elif not os.access(install_pl, os.X_OK):
        missing.append(f"{install_pl} is not executable")
    else:
        shebang = install_pl.read_bytes()[:200].split(b"\n", 1)[0]
        interp = shebang[2:].decode(errors="replace").split()[:1] if shebang[:2] == b"#!" else []
        if interp and not Path(interp[0]).is_file() and "/" in interp[0]:
            missing.append(f"{interp[0]} (install.pl's interpreter): install perl in the image")
    headers = paths.resolve(f"/lib/modules/{kernel}/build")
    if not headers.is_dir():
        missing.append(f"the kernel headers for {kernel}: {headers} does not exist (install "
                       f"linux-headers-{kernel} or kernel-devel-{kernel} in the image, or mount "
                       "them)")
    path = commands.env.get("PATH", os.defpath)
    for tool in BUILD_TOOLS:
        if shutil.which(tool, path=path) is None:
            missing.append(f"{tool}: not on PATH ({path}); install it in the image (the "
                           "kernel's own compiler version)")
    return missing


def build_locally(paths: NodePaths, source: Path, kernel: str, append_flags: str,
                  commands: Commands, *, log_path: Path, timeout_s: float, progress_s: float,
                  stop: threading.Event, nfsrdma: bool, family: str) -> list[Path]:
    """Run install.pl in `source` for `kernel`; return the packages it built.
    ProvisionError (with the log's tail) when it fails; CommandStopped on a stop request."""
    log = get_logger("provision")
    if missing := missing_prerequisites(paths, source, kernel, commands):
        raise ProvisionError("cannot build the driver, missing: " + "; ".join(missing))
    for sub in ("DEBS", "RPMS"):  # a previous build's packages must not pass for this one's
        shutil.rmtree(source / sub, ignore_errors=True)
    argv = install_args(str(source / "install.pl"), kernel, append_flags, rhel_distro(kernel),
                        nfsrdma=nfsrdma, family=family)
    log.info("build.started", kernel=kernel, argv=argv, log=str(log_path), timeout_s=timeout_s)
    try:
        rc = commands.run_logged(argv, log_path=log_path, timeout_s=timeout_s, stop=stop,
                                 progress_s=progress_s, what="build the driver", cwd=source)
    except CommandTimeout as e:
        raise ProvisionError(f"{e} (BUILD_TIMEOUT_SEC); its log: {log_path}; last lines:\n"
                             f"{tail(read_text_or_empty(log_path))}") from None
    if rc != 0:
        raise ProvisionError(f"the driver build failed (install.pl exited {rc}); its log: "
                             f"{log_path}; last lines:\n{tail(read_text_or_empty(log_path))}")
    packages = find_packages(source)
    if not packages:
        raise ProvisionError(f"install.pl succeeded but left no package under {source}/DEBS "
                             f"or RPMS; its log: {log_path}")
    return packages
