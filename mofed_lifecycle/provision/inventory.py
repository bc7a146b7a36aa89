"""The build cache on the node (NVIDIA_NIC_DRIVERS_INVENTORY_PATH) and the package install.

An entry is `<inventory>/<kernel>/<version>/` (the packages a build produced), with
`<version>.checksum` and `<version>.buildconfig` beside it (plan.py has the layout and the rules).
An entry is written under a temporary name and renamed into place, its checksum last: a build
killed mid-copy leaves no entry that looks whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..host.commands import Commands
from ..host.files import atomic_write_text, fsync_dir
from ..host.paths import NodePaths
from ..log import get_logger
from .plan import (
    BUILDCONFIG_SUFFIX,
    CHECKSUM_SUFFIX,
    PACKAGE_SUFFIXES,
    BuildSpec,
    checksum_text,
    entry_problem,
    stale_entries,
)


class ProvisionError(RuntimeError):
    """The driver could not be put onto the node; the message says why and what to do."""


def kernel_release(paths: NodePaths) -> str:
    """The running kernel (`uname -r`), read under the node root."""
    return paths.resolve("/proc/sys/kernel/osrelease").read_text().strip()


def package_family(paths: NodePaths) -> str:
    """"deb" or "rpm": how this image installs packages (its /etc/os-release)."""
    fields: dict[str, str] = {}
    try:
        for line in paths.resolve("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            fields[k.strip()] = v.strip().strip('"')
    except OSError:
        pass
    ids = {fields.get("ID", ""), *fields.get("ID_LIKE", "").split()}
    if ids & {"ubuntu", "debian"}:
        return "deb"
    if ids & {"rhel", "centos", "fedora", "rocky", "almalinux", "sles", "suse", "opensuse"}:
        return "rpm"
    raise ProvisionError(f"cannot tell how to install packages in this image: /etc/os-release "
                         f"ID={fields.get('ID', '')!r} ID_LIKE={fields.get('ID_LIKE', '')!r} "
                         "(known: Ubuntu/Debian, RHEL and its family, SLES)")


def find_packages(tree: Path) -> list[Path]:
    """The driver packages a build left under `tree` (install.pl writes DEBS/ or RPMS/)."""
    found: list[Path] = []
    for sub in ("DEBS", "RPMS"):
        base = tree / sub
        if base.is_dir():
            found += [p for p in base.rglob("*") if p.suffix in PACKAGE_SUFFIXES and p.is_file()]
    return sorted(found)


def _entry_shaped(p: Path, *, top: bool) -> bool:
    """What a build cache holds: a kernel directory of entries (`top`), or one entry (a directory
    of packages, a `.checksum`/`.buildconfig` file, a partial copy)."""
    if p.is_symlink():
        return False
    if top:
        return p.is_dir() and all(_entry_shaped(c, top=False) for c in p.iterdir())
    if p.is_file():
        return p.name.endswith((CHECKSUM_SUFFIX, BUILDCONFIG_SUFFIX))
    return p.is_dir() and all(c.is_file() and (c.suffix in PACKAGE_SUFFIXES) for c in p.iterdir())


def _files(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir()) if p.is_file()}


class Inventory:
    """One kernel's and version's entry in the build cache."""

    def __init__(self, root: Path, spec: BuildSpec) -> None:
        self.root, self.spec = root, spec
        self.kernel_dir = root / spec.kernel
        self.entry = self.kernel_dir / spec.version
        self.checksum = self.kernel_dir / (spec.version + CHECKSUM_SUFFIX)
        self.buildconfig = self.kernel_dir / (spec.version + BUILDCONFIG_SUFFIX)

    def packages(self) -> list[Path]:
        if not self.entry.is_dir():
            return []
        return sorted(p for p in self.entry.iterdir() if p.suffix in PACKAGE_SUFFIXES)

    def problem(self) -> str | None:
        """None when the entry can be installed as it is; else why it must be rebuilt."""
        def read(p: Path) -> str | None:
            try:
                return p.read_text()
            except OSError:
                return None

        has_dir = self.entry.is_dir()
        actual = checksum_text(_files(self.entry)) if has_dir else None
        return entry_problem(self.spec, has_dir=has_dir, packages=[p.name for p in
                                                                    self.packages()],
                             stored_checksum=read(self.checksum), actual_checksum=actual,
                             stored_buildconfig=read(self.buildconfig))

    def clean(self) -> tuple[list[str], list[str]]:
        """Delete other kernels' and versions' entries (and a partial one): (deleted, left).
        Only what looks like an inventory entry is ever deleted (package directories, their
        .checksum and .buildconfig): anything else found there is left, and named."""
        if not self.root.is_dir():
            return [], []
        listing = {k.name: [e.name for e in k.iterdir()] for k in self.root.iterdir()
                   if k.is_dir() and not k.is_symlink()}
        removed, left = [], []
        for rel in stale_entries(listing, self.spec.kernel, self.spec.version):
            p = self.root / rel
            if not _entry_shaped(p, top="/" not in rel):
                left.append(rel)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(rel)
        return removed, left

    def store(self, packages: list[Path]) -> None:
        """Replace the entry with `packages` (copied), then its build config and checksum."""
        if not packages:
            raise ProvisionError("the build produced no package (no .deb or .rpm under DEBS/ "
                                 "or RPMS/): see the build log")
        self.kernel_dir.mkdir(parents=True, exist_ok=True)
        self.checksum.unlink(missing_ok=True)  # an entry without a checksum is never installed
        tmp = self.kernel_dir / f".{self.spec.version}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for p in packages:
            shutil.copy2(p, tmp / p.name)
        shutil.rmtree(self.entry, ignore_errors=True)
        tmp.rename(self.entry)
        atomic_write_text(self.buildconfig, self.spec.fingerprint())
        atomic_write_text(self.checksum, checksum_text(_files(self.entry)) + "\n")
        fsync_dir(self.kernel_dir)


def install_packages(packages: list[Path], family: str, kernel: str, commands: Commands,
                     timeout_s: float) -> None:
    """Install the driver packages into this image, then `depmod` for `kernel`."""
    log = get_logger("provision")
    names = [str(p) for p in packages]
    argv = (["dpkg", "-i", "--force-confold", *names] if family == "deb" else
            ["rpm", "-Uvh", "--force", "--nodeps", *names])
    res = commands.run(argv, timeout_s=timeout_s, what="install the driver packages")
    if not res.ok:
        raise ProvisionError(f"{argv[0]} could not install the driver packages (exit "
                             f"{res.returncode}): {(res.stderr or res.stdout).strip()[-500:]}")
    res = commands.run(["depmod", "-a", kernel], timeout_s=timeout_s,
                       what="index the installed modules")
    if not res.ok:
        raise ProvisionError(f"depmod -a {kernel} failed (exit {res.returncode}): "
                             f"{res.stderr.strip()[-300:]}")
    log.info("packages.installed", packages=[p.name for p in packages], family=family,
             kernel=kernel)
