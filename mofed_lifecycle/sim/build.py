"""[build] on a simulated node (contract version 2): the driver built on the node.

`sim init` in `sources` or `dtk` mode leaves the driver's modules out of the image's
`/lib/modules/<kernel>/updates/` (the kernel refuses to load what is not there), and renders what a
`sources` image holds: the driver's source tree with a stand-in `install.pl`, the kernel headers
directory, `/etc/os-release`; with `cache = "warm"`, the inventory already holds a matching build.

The stand-in `install.pl` takes `[build] build_s` (scaled), printing progress, fails the first
`build_failures` times (counted across runs of the node), and leaves one package under `DEBS/`
(Ubuntu) or `RPMS/` (RHEL kernels, `.el` in the release). A package is JSON: the files it installs;
the stand-in `dpkg -i` / `rpm -U` write them, which changes what `modinfo` reports. Every step is
recorded in `.sim/build.jsonl` (wall-clock times) for the report's `build_s`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .scenario import Scenario
from .tree import driver_module_files

PACKAGE = "mlnx-ofed-kernel-modules"
DEFAULT_SOURCE = "/root/MLNX_OFED_SRC-{version}"
DEFAULT_INVENTORY = "/mnt/drivers-inventory"
DEFAULT_DTK_SHARED = "/mnt/shared-doca-driver-toolkit"  # what the operator injects
BUILD_LOG = "build.jsonl"


def family(sc: Scenario) -> str:
    return "rpm" if ".el" in sc.kernel else "deb"


def build_env(sc: Scenario) -> dict[str, str]:
    """The variables a `sources` (or DTK) driver container gets: its image's and the operator's."""
    if not sc.build.builds:
        return {}
    env = {"NVIDIA_NIC_DRIVER_PATH": DEFAULT_SOURCE.format(version=sc.installed_version),
           "NVIDIA_NIC_DRIVERS_INVENTORY_PATH": DEFAULT_INVENTORY}
    if sc.build.mode == "dtk":
        env.update(DTK_OCP_DRIVER_BUILD="true", DTK_OCP_NIC_SHARED_DIR=DEFAULT_DTK_SHARED)
    return env


def package_files(sc: Scenario) -> dict[str, str]:
    return driver_module_files(sc)


def package_name(sc: Scenario) -> str:
    arch = "x86_64" if family(sc) == "rpm" else "amd64"
    ext = "rpm" if family(sc) == "rpm" else "deb"
    return f"{PACKAGE}_{sc.installed_version}_{arch}.{ext}"


def package_bytes(sc: Scenario) -> bytes:
    return (json.dumps({"package": PACKAGE, "version": sc.installed_version,
                        "files": package_files(sc)}, sort_keys=True) + "\n").encode()


def output_dir(sc: Scenario) -> str:
    """Where install.pl leaves its packages, relative to the source tree."""
    if family(sc) == "rpm":
        return "RPMS/redhat-release-9.4/x86_64"
    return "DEBS/ubuntu22.04/x86_64"


def record(root: Path, event: str, **fields: Any) -> None:
    with (root / ".sim" / BUILD_LOG).open("a") as f:
        f.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")


def read_record(root: Path) -> list[dict[str, Any]]:
    path = root / ".sim" / BUILD_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render_build(root: Path, sc: Scenario, env: dict[str, str], tool_script: str) -> None:
    """What a `sources` image and its node hold before the container starts."""
    if not sc.build.builds:
        return
    source = root / env["NVIDIA_NIC_DRIVER_PATH"].lstrip("/")
    source.mkdir(parents=True, exist_ok=True)
    (source / "install.pl").write_text(tool_script)
    (source / "install.pl").chmod(0o755)
    (source / "README.txt").write_text(f"driver sources {sc.installed_version} (simulated)\n")
    (root / "lib/modules" / sc.kernel / "build").mkdir(parents=True, exist_ok=True)
    (root / "lib/modules" / sc.kernel / "build" / "Makefile").write_text("# headers\n")
    osr = root / "etc/os-release"
    if not osr.exists():
        osr.write_text('ID="rhel"\nID_LIKE="fedora"\nVERSION_ID="9.4"\n' if family(sc) == "rpm"
                       else 'ID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\n')
    if sc.build.cache == "warm" and env.get("NVIDIA_NIC_DRIVERS_INVENTORY_PATH"):
        warm_inventory(root, sc, env)


def warm_inventory(root: Path, sc: Scenario, env: dict[str, str]) -> None:
    """The inventory as a previous run left it: this kernel's and version's build, with the
    checksum and build configuration the daemon would have written (its own code computes them)."""
    from ..config import load_config
    from ..provision.inventory import Inventory
    from ..provision.plan import BuildSpec

    c = load_config(env, require_driver_version=False)
    spec = BuildSpec(sc.kernel, c.driver_version or sc.installed_version,
                     c.append_driver_build_flags, c.enable_nfsrdma)
    inv = Inventory(root / c.inventory_path.lstrip("/"), spec)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / package_name(sc)
        pkg.write_bytes(package_bytes(sc))
        inv.store([pkg])


# ---- the stand-in tools ---------------------------------------------------------------------


def install_pl(root: Path, sc: Scenario, argv0: str, argv: list[str], out: Any, err: Any,
               pause: Any) -> int:
    """`install.pl --kernel K --build-only ...`: build for `[build] build_s` (scaled)."""
    source = Path(argv0).resolve().parent
    kernel = argv[argv.index("--kernel") + 1] if "--kernel" in argv[:-1] else ""
    if "--build-only" not in argv:
        print("install.pl (simulated): only --build-only builds are simulated", file=err)
        return 2
    if kernel != sc.kernel:
        print(f"Error: kernel {kernel or '(none)'} headers not found (this node runs "
              f"{sc.kernel})", file=err)
        return 1
    attempts = sum(1 for r in read_record(root) if r["event"] == "build.start") + 1
    record(root, "build.start", attempt=attempts, source=str(source), argv=argv,
           pid=os.getpid(), ppid=os.getppid())
    total = sc.scaled(sc.build.build_s)
    failing = attempts <= sc.build.build_failures
    steps = 10
    for i in range(steps):
        print(f"Building mlnx-ofa_kernel ({i * 10}%)", file=out, flush=True)
        pause(total / steps / (2 if failing else 1))
    if failing:
        print("make[2]: *** [mlx5_core/en_main.o] Error 1\nError: mlnx-ofa_kernel build "
              f"failed (simulated failure {attempts} of {sc.build.build_failures})", file=out,
              flush=True)
        record(root, "build.fail", attempt=attempts)
        return 1
    dest = source / output_dir(sc)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / package_name(sc)).write_bytes(package_bytes(sc))
    print(f"Build passed: {dest / package_name(sc)}", file=out, flush=True)
    record(root, "build.end", attempt=attempts, pid=os.getpid())
    return 0


def install_packages(root: Path, tool: str, argv: list[str], out: Any, err: Any) -> int:
    """`dpkg -i FILE...` / `rpm -Uvh FILE...`: write each package's files under the node."""
    files = [a for a in argv if not a.startswith("-")]
    if not files:
        print(f"{tool}: no package given", file=err)
        return 1
    for f in files:
        p = Path(f)
        try:
            pkg = json.loads(p.read_text())
            contents: dict[str, str] = pkg["files"]
        except (OSError, ValueError, KeyError, TypeError):
            print(f"{tool}: error: {f}: not a package (or unreadable)", file=err)
            return 1
        for path, text in contents.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        print(f"Setting up {pkg.get('package')} ({pkg.get('version')}) ...", file=out)
    record(root, "install.end", tool=tool, packages=[Path(f).name for f in files])
    return 0
