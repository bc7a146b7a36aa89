"""How the driver gets onto the node: the pure part (names, arguments, fingerprints, cleanup).

No I/O here. The host side (`sources.py`, `inventory.py`, `dtk.py`, `sidecar.py`) asks these
functions what to run, where to put it and what to keep, so that every decision is testable
without a node. The layout and the file names are the upstream driver container's, so that an
inventory or a DTK shared directory written by either is read by the other
(`shared/field-notes.md` §7):

    <NVIDIA_NIC_DRIVERS_INVENTORY_PATH>/<kernel>/<version>/          the built packages
    <NVIDIA_NIC_DRIVERS_INVENTORY_PATH>/<kernel>/<version>.checksum  checksum of those files
    <NVIDIA_NIC_DRIVERS_INVENTORY_PATH>/<kernel>/<version>.buildconfig  what they were built with

    <DTK_OCP_NIC_SHARED_DIR>/<sanitised kernel>/MLNX_OFED_SRC-<version>/  the sources
    .../dtk.env, dtk_nic_driver_build.sh, entrypoint                      for the sidecar
    .../dtk_start_compile, dtk_done_compile_<version, . and - as _>       the two flags
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    PRECOMPILED = "precompiled"  # the driver is in the image: nothing to build
    SOURCES = "sources"  # built here (or by the DTK sidecar) from NVIDIA_NIC_DRIVER_PATH


START_FLAG = "dtk_start_compile"
DONE_FLAG_PREFIX = "dtk_done_compile_"
DTK_ENV = "dtk.env"
DTK_SCRIPT = "dtk_nic_driver_build.sh"  # what the operator's sidecar runs from the shared dir
DTK_ENTRYPOINT = "entrypoint"  # what that script execs as `entrypoint dtk-build`
DTK_HEARTBEAT = "dtk_heartbeat.json"  # ours: an upstream sidecar writes none
DTK_LOCK = "dtk_sidecar.lock"  # ours: held by a running sidecar (free once it has died)
# ours: the main container holds it exclusively while it fills the directory, our sidecar shared
# while it builds: neither pulls the sources from under the other
DTK_PREPARE_LOCK = "dtk_prepare.lock"
DTK_FAILED = "dtk_build_failed.json"  # ours: the sidecar's last build failed (why, log tail)
DTK_BUILDCONFIG = "dtk.buildconfig"  # ours: the fingerprint the done flag was built for
CHECKSUM_SUFFIX = ".checksum"
BUILDCONFIG_SUFFIX = ".buildconfig"
PACKAGE_SUFFIXES = (".deb", ".rpm")

# Always passed to install.pl (upstream's sources-mode build): modules only, no userspace,
# no dependency check (headers and compiler are the image's job; we check them first).
BASE_BUILD_FLAGS = ("--without-depcheck", "--kernel-only", "--build-only", "--with-mlnx-tools")
# packages left out; on Ubuntu their names end in `-modules` (upstream's package suffix)
WITHOUT = ("knem", "iser", "isert", "srp", "kernel-mft", "mlnx-rdma-rxe")
WITHOUT_UNLESS_NFSRDMA = ("mlnx-nfsrdma", "mlnx-nvme")
TAIL_FLAGS = ("--without-xpmem", "--without-xpmem-modules", "--disable-kmp", "--without-dkms")
DTK_FLAGS = ("--with-ofed-scripts", "--copy-ifnames-udev")  # upstream's DTK build adds these
KERNEL_NAME_RE = re.compile(r"[^-A-Za-z0-9_.]")


def sanitise_kernel(release: str) -> str:
    """The kernel release as Node Feature Discovery labels it (and the operator names the DTK
    volume's directory): every character but letters, digits, `-`, `_` and `.` becomes `_`, then
    leading and trailing `-`, `_`, `.` are trimmed."""
    return KERNEL_NAME_RE.sub("_", release).strip("-._")


def done_flag_name(version: str) -> str:
    """`dtk_done_compile_25_07_0_9_7` for 25.07-0.9.7: the sidecar's "built" flag."""
    return DONE_FLAG_PREFIX + version.replace(".", "_").replace("-", "_")


def split_flags(text: str) -> tuple[str, ...]:
    """APPEND_DRIVER_BUILD_FLAGS as shell words (quotes allowed); ValueError if unbalanced."""
    return tuple(shlex.split(text))


def install_args(install_pl: str, kernel: str, append_flags: str, distro: str | None = None,
                 *, nfsrdma: bool = False, family: str = "rpm", dtk: bool = False) -> list[str]:
    """The install.pl command line of a build for `kernel` (`distro`: `--distro rhel9.4`;
    `family` "deb": Ubuntu's package names; `nfsrdma`: keep the NFS-RDMA and NVMe-oF modules)."""
    suffix = "-modules" if family == "deb" else ""
    left_out = [*WITHOUT, *(() if nfsrdma else WITHOUT_UNLESS_NFSRDMA)]
    args = [install_pl, "--kernel", kernel, *BASE_BUILD_FLAGS,
            *(f"--without-{p}{suffix}" for p in left_out), *TAIL_FLAGS, *(DTK_FLAGS if dtk else ())]
    if distro:
        args += ["--distro", distro]
    return [*args, *split_flags(append_flags)]


def rhel_distro(kernel: str) -> str | None:
    """`rhel9.4` for 5.14.0-427.22.1.el9_4.x86_64 (what install.pl's --distro wants on RHEL)."""
    if m := re.search(r"\.el(\d+)_(\d+)", kernel):
        return f"rhel{m[1]}.{m[2]}"
    if m := re.search(r"\.el(\d+)", kernel):
        return f"rhel{m[1]}"
    return None


@dataclass(frozen=True)
class BuildSpec:
    """What a build is for: the inventory entry is reused only for the same spec."""

    kernel: str
    version: str
    append_flags: str
    enable_nfsrdma: bool

    def fingerprint(self) -> str:
        """The `.buildconfig` text: one `KEY=value` line per build-affecting input (upstream's
        keys, plus the kernel and version so that a copied entry cannot pass for another)."""
        return (f"KERNEL={self.kernel}\nNVIDIA_NIC_DRIVER_VER={self.version}\n"
                f"ENABLE_NFSRDMA={str(self.enable_nfsrdma).lower()}\nUSE_DKMS=false\n"
                f"APPEND_DRIVER_BUILD_FLAGS={self.append_flags}\n")

    def digest(self) -> str:
        return hashlib.sha256(self.fingerprint().encode()).hexdigest()[:16]


def checksum_text(files: dict[str, bytes]) -> str:
    """The `.checksum` of an entry: sha256 over each file's name and content, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return "sha256:" + h.hexdigest()


def entry_problem(spec: BuildSpec, *, has_dir: bool, packages: list[str],
                  stored_checksum: str | None, actual_checksum: str | None,
                  stored_buildconfig: str | None) -> str | None:
    """Why an inventory entry cannot be installed as it is (None: it can). Each reason is one a
    rebuild fixes: nothing there, a partial copy, a file changed since, or built otherwise."""
    if not has_dir:
        return "no entry for this kernel and version (a cold cache)"
    if not packages:
        return "the entry holds no package (an interrupted copy)"
    if stored_checksum is None:
        return "the entry has no checksum file (an interrupted build, or not ours)"
    if stored_checksum.strip() != actual_checksum:
        return "the entry's files do not match its checksum (corrupt or changed)"
    if stored_buildconfig is None:
        return "the entry has no build configuration (built by an older container)"
    if stored_buildconfig != spec.fingerprint():
        return "the entry was built with another configuration (kernel, flags or NFS-RDMA)"
    return None


def stale_entries(listing: dict[str, list[str]], kernel: str, version: str) -> list[str]:
    """What to delete from the inventory: `listing` maps each kernel directory to its entries;
    kept are this kernel's entry for this version, with its checksum and build config.
    Returns paths relative to the inventory root (a kernel directory, or `kernel/entry`)."""
    keep = {version, version + CHECKSUM_SUFFIX, version + BUILDCONFIG_SUFFIX}
    out: list[str] = []
    for kdir, entries in sorted(listing.items()):
        if kdir != kernel:
            out.append(kdir)
            continue
        out += [f"{kdir}/{e}" for e in sorted(entries) if e not in keep]
    return out


def dtk_env_text(*, shared_dir: str, version: str, append_flags: str, kernel: str,
                 heartbeat_s: float, build_timeout_s: float, nfsrdma: bool = False) -> str:
    """`dtk.env`, sourced by the sidecar's script: upstream's variables (so an upstream sidecar
    builds from it too), then ours."""
    start, done = f"{shared_dir}/{START_FLAG}", f"{shared_dir}/{done_flag_name(version)}"

    def q(v: str) -> str:
        return shlex.quote(v)

    # upstream's main container puts the kernel (and RHEL's distro) into the flags it hands an
    # upstream sidecar; ours reads the user's own from MOFED_LIFECYCLE_APPEND_FLAGS
    distro = rhel_distro(kernel)
    upstream_flags = " ".join([append_flags, "--kernel", q(kernel),
                               *(["--distro", distro] if distro else [])]).strip()

    return (
        "# written by mofed-lifecycle (the driver container) for the DTK sidecar\n"
        f"export DTK_OCP_NIC_SHARED_DIR={q(shared_dir)}\n"
        f"export DTK_OCP_COMPILED_DRIVER_VER={q(version)}\n"
        f"export DTK_OCP_START_COMPILE_FLAG={q(start)}\n"
        f"export DTK_OCP_DONE_COMPILE_FLAG={q(done)}\n"
        f"export APPEND_DRIVER_BUILD_FLAGS={q(upstream_flags)}\n"
        f"export MOFED_LIFECYCLE_APPEND_FLAGS={q(append_flags)}\n"
        f"export ENABLE_NFSRDMA={str(nfsrdma).lower()}\n"
        f"export NVIDIA_NIC_DRIVER_VER={q(version)}\n"
        "export USE_DKMS=false\n"
        f"export MOFED_LIFECYCLE_DTK_KERNEL={q(kernel)}\n"
        f"export HEARTBEAT_INTERVAL_SEC={heartbeat_s:g}\n"
        f"export BUILD_TIMEOUT_SEC={build_timeout_s:g}\n"
    )


def strip_kernel_flags(flags: str) -> str:
    """An upstream main container's APPEND_DRIVER_BUILD_FLAGS without its `--kernel K` and
    `--distro D` (our sidecar passes its own)."""
    words, out = list(split_flags(flags)), []
    it = iter(words)
    for w in it:
        if w in ("--kernel", "--distro"):
            next(it, None)
            continue
        out.append(w)
    return shlex.join(out)


def parse_env_file(text: str) -> dict[str, str]:
    """The `export NAME=value` lines of a dtk.env (shell-quoted values), others ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("export ") or "=" not in line:
            continue
        name, _, value = line[len("export "):].partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        out[name.strip()] = words[0] if words else ""
    return out


def tail(text: str, lines: int = 20, chars: int = 2000) -> str:
    """The end of a build log, for an error message."""
    return "\n".join(text.splitlines()[-lines:])[-chars:]
