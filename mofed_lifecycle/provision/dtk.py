"""OpenShift: hand the build to the driver-toolkit (DTK) sidecar, the main container's side.

The main container fills `<DTK_OCP_NIC_SHARED_DIR>/<sanitised kernel>/` the way upstream does
(the sources as `MLNX_OFED_SRC-<version>`, `dtk.env`, the sidecar's script and entry point) and
creates `dtk_start_compile`; the sidecar builds and creates `dtk_done_compile_<version>`. We wait
for that flag by inotify (noticed within milliseconds, not a 30 s poll), with a deadline.

Our sidecar (`mofed-lifecycle dtk-build`, sidecar.py) also holds `dtk_sidecar.lock` while it runs
and rewrites `dtk_heartbeat.json` every HEARTBEAT_INTERVAL_SEC: a lock let go means it died (seen
at the next check, a quarter of its heartbeat period), a heartbeat older than three periods means
it hangs; a failed build leaves `dtk_build_failed.json` with its log's tail. An upstream sidecar
writes none of these: then only the done flag and the deadline count.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..host.files import atomic_write_text
from ..host.inotify import FileWatcher
from ..log import get_logger
from .inventory import ProvisionError
from .plan import (
    DTK_BUILDCONFIG,
    DTK_ENTRYPOINT,
    DTK_ENV,
    DTK_FAILED,
    DTK_HEARTBEAT,
    DTK_LOCK,
    DTK_PREPARE_LOCK,
    DTK_SCRIPT,
    START_FLAG,
    BuildSpec,
    done_flag_name,
    dtk_env_text,
)

HUNG_AFTER_BEATS = 3
STOP_CHECK_S = 0.2
# what the sidecar's interpreter imports: this package and the pure-Python libraries it needs
SIDECAR_PACKAGES = ("mofed_lifecycle", "structlog")

SCRIPT = """#!/bin/sh
# Written by mofed-lifecycle (the driver container) for the DTK sidecar: the operator's sidecar
# runs this file; it reads dtk.env beside it and runs `mofed-lifecycle dtk-build`.
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
if [ ! -f "$here/dtk.env" ]; then
    for d in "$here"/*/; do [ -f "$d/dtk.env" ] && here=${d%/} && break; done
fi
[ -f "$here/dtk.env" ] && . "$here/dtk.env"
exec "$here/entrypoint" dtk-build
"""

LAUNCHER = """#!/bin/sh
# Written by mofed-lifecycle: runs `mofed-lifecycle ARGS` with the copy of the package beside it,
# on the first Python 3.11+ of this image (MOFED_LIFECYCLE_PYTHON first). The DTK image is RHEL's:
# without one, python3.11 is installed with dnf, as the sidecar installs perl for install.pl.
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
run() {
    for py in "${MOFED_LIFECYCLE_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || continue
        PYTHONPATH="$here/pylib" exec "$py" -c \\
            'import sys; from mofed_lifecycle.cli import main; sys.exit(main(sys.argv[1:]))' "$@"
    done
}
run "$@"
if command -v dnf >/dev/null 2>&1; then
    echo "mofed-lifecycle: no Python 3.11 or newer here: dnf install -y python3.11" >&2
    # in the background, so that SIGTERM (this may be the container's PID 1) stops it at once;
    # at most 15 minutes
    trap 'kill "$child" 2>/dev/null; exit 143' TERM INT
    if command -v timeout >/dev/null 2>&1; then
        timeout 900 dnf install -y python3.11 >&2 & child=$!
    else
        dnf install -y python3.11 >&2 & child=$!
    fi
    wait "$child" && run "$@"
fi
echo "mofed-lifecycle: no Python 3.11 or newer in this image (tried MOFED_LIFECYCLE_PYTHON," \\
     "python3.13, python3.12, python3.11, python3, and dnf): install one" >&2
exit 1
"""


class DtkStopped(RuntimeError):
    """The wait for the sidecar was cut short by a stop request."""


def shared_dir_for(base: Path, sanitised_kernel: str) -> Path:
    return base / sanitised_kernel


def _copy_package(name: str, dest: Path) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ProvisionError(f"cannot find the {name} package to give to the DTK sidecar")
    src = Path(next(iter(spec.submodule_search_locations)))
    shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)


def _executable(path: Path, text: str) -> None:
    atomic_write_text(path, text, mode=0o755)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def done_for_this_build(shared: Path, spec: BuildSpec) -> bool:
    """A done flag already there counts if it was for this build (or written without our
    fingerprint: an upstream main container's, reused as upstream reuses it)."""
    if not (shared / done_flag_name(spec.version)).exists():
        return False
    try:
        built_for = (shared / DTK_BUILDCONFIG).read_text()
    except OSError:
        return True
    return built_for == spec.fingerprint()


def build_under_way(shared: Path, spec: BuildSpec) -> bool:
    """Our sidecar is alive (its lock held) and building this very build, or about to take its
    start flag: a main container restarted (or re-checking) waits for it instead of preparing
    again under its feet."""
    side = look_at_sidecar(shared)
    if not side.beating or side.lock_free:
        return False
    if side.phase == "building":
        return side.fingerprint == spec.digest()
    # alive, and about to take a start flag already there for this build: preparing again would
    # pull the sources from under it
    try:
        same = (shared / DTK_BUILDCONFIG).read_text() == spec.fingerprint()
    except OSError:
        same = False
    return same and (shared / START_FLAG).exists() and (
        shared / f"MLNX_OFED_SRC-{spec.version}" / "install.pl").is_file()


class SidecarBuilding(RuntimeError):
    """Our sidecar holds the prepare lock: a build is under way; wait for it, do not prepare."""


@contextlib.contextmanager
def preparing(shared: Path) -> Iterator[None]:
    """The prepare lock, exclusively and at once, or SidecarBuilding."""
    shared.mkdir(parents=True, exist_ok=True)
    fd = os.open(shared / DTK_PREPARE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SidecarBuilding(str(shared)) from None
        yield
    finally:
        os.close(fd)


def prepare(shared: Path, source: Path, spec: BuildSpec, *, heartbeat_s: float,
            build_timeout_s: float) -> bool:
    """Fill the shared directory for a build and create the start flag (last, atomically).
    False (nothing touched) when our sidecar is building right now: wait for that build."""
    if not (source / "install.pl").is_file():
        raise ProvisionError(f"no install.pl in {source}: NVIDIA_NIC_DRIVER_PATH must be the "
                             "unpacked driver source tree, which the DTK sidecar builds")
    try:
        with preparing(shared):
            _fill(shared, source, spec, heartbeat_s=heartbeat_s, build_timeout_s=build_timeout_s)
    except SidecarBuilding:
        get_logger("provision").info("dtk.sidecar_building", shared_dir=str(shared),
                                     why="its build holds the prepare lock: waiting for it")
        return False
    return True


def _fill(shared: Path, source: Path, spec: BuildSpec, *, heartbeat_s: float,
          build_timeout_s: float) -> None:
    log = get_logger("provision")
    stale = [START_FLAG, done_flag_name(spec.version), DTK_FAILED]
    if _lock_free(shared / DTK_LOCK):  # no sidecar alive: its last heartbeat says nothing now
        stale.append(DTK_HEARTBEAT)
    for name in stale:
        (shared / name).unlink(missing_ok=True)
    dest = shared / f"MLNX_OFED_SRC-{spec.version}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, symlinks=True)
    pylib = shared / "pylib"
    shutil.rmtree(pylib, ignore_errors=True)
    for name in SIDECAR_PACKAGES:
        _copy_package(name, pylib)
    atomic_write_text(shared / DTK_ENV, dtk_env_text(
        shared_dir=str(shared), version=spec.version, append_flags=spec.append_flags,
        kernel=spec.kernel, heartbeat_s=heartbeat_s, build_timeout_s=build_timeout_s,
        nfsrdma=spec.enable_nfsrdma))
    atomic_write_text(shared / DTK_BUILDCONFIG, spec.fingerprint())
    _executable(shared / DTK_SCRIPT, SCRIPT)
    _executable(shared / DTK_ENTRYPOINT, LAUNCHER)
    # the operator's sidecar waits for the start flag at the top of the volume, then runs the
    # script there: both lead to this directory's dtk.env
    _executable(shared.parent / DTK_SCRIPT, SCRIPT)
    atomic_write_text(shared / START_FLAG, f"{time.time():.6f}\n")
    with contextlib.suppress(OSError):
        atomic_write_text(shared.parent / START_FLAG, f"{shared.name}\n")
    log.info("dtk.prepared", shared_dir=str(shared), sources=str(dest),
             start_flag=str(shared / START_FLAG), done_flag=done_flag_name(spec.version))


@dataclass
class SidecarView:
    """What the shared directory says about the sidecar, at one look."""

    beating: bool  # a heartbeat file is there (our sidecar)
    age_s: float | None
    lock_free: bool
    phase: str | None
    fingerprint: str | None = None  # the build it is on


def _lock_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops our shared lock at once
    return True


def look_at_sidecar(shared: Path) -> SidecarView:
    try:
        beat = json.loads((shared / DTK_HEARTBEAT).read_text())
        age = time.time() - float(beat["time"])
        phase = str(beat.get("phase"))
        fingerprint = beat.get("fingerprint")
    except (OSError, ValueError, KeyError, TypeError):
        return SidecarView(False, None, _lock_free(shared / DTK_LOCK), None)
    return SidecarView(True, age, _lock_free(shared / DTK_LOCK), phase,
                       fingerprint if isinstance(fingerprint, str) else None)


def wait_for_build(shared: Path, spec: BuildSpec, *, timeout_s: float, heartbeat_s: float,
                   progress_s: float, stop: threading.Event) -> float:
    """Wait for the done flag; return the wall-clock time it was noticed. ProvisionError when
    the sidecar failed, died, hung or the deadline passed; DtkStopped on a stop request."""
    log = get_logger("provision")
    done, failed = shared / done_flag_name(spec.version), shared / DTK_FAILED
    watcher = FileWatcher([done, failed, shared / DTK_HEARTBEAT])
    finished = threading.Event()

    def wake_on_stop() -> None:  # a stop request ends the inotify wait within STOP_CHECK_S
        while not finished.is_set():
            if stop.wait(STOP_CHECK_S):
                watcher.wake()
                return

    waker = threading.Thread(target=wake_on_stop, daemon=True, name="dtk-stop")
    waker.start()
    start = time.monotonic()
    deadline, next_progress = start + timeout_s, start + progress_s
    check = max(0.01, heartbeat_s / 4)
    said_upstream = said_gone = False
    try:
        while True:
            if done.exists():
                noticed = time.time()
                log.info("dtk.build_done", flag=str(done),
                         waited_s=round(time.monotonic() - start, 3))
                if not said_upstream and not look_at_sidecar(shared).beating:
                    log.info("dtk.no_heartbeat", why="the sidecar wrote no heartbeat: an "
                             "upstream one (only the done flag and the deadline counted)")
                return noticed
            if stop.is_set():
                raise DtkStopped("stopped while the DTK sidecar builds")
            if failed.exists():
                raise ProvisionError("the DTK sidecar's build failed: " + _failure(failed))
            now = time.monotonic()
            side = look_at_sidecar(shared)
            if side.beating and side.lock_free and side.phase == "building":
                raise ProvisionError("the DTK sidecar died during the build (its lock "
                                     f"{shared / DTK_LOCK} was let go, last heartbeat "
                                     f"{side.age_s:.1f}s ago): kubelet restarts it; the build "
                                     "is handed to it again at the next re-check")
            if side.beating and side.lock_free and not said_gone:
                said_gone = True  # not building: a restarted sidecar takes the start flag
                log.warning("dtk.sidecar_gone", phase=side.phase, next="waiting: kubelet "
                            "restarts it and it takes the start flag")
            if side.beating and side.age_s is not None and \
                    side.age_s > HUNG_AFTER_BEATS * heartbeat_s:
                raise ProvisionError(f"the DTK sidecar hangs: no heartbeat for "
                                     f"{side.age_s:.0f}s (every {heartbeat_s:g}s expected); "
                                     "check the openshift-driver-toolkit-ctr container's log")
            if not side.beating and not said_upstream and now - start > heartbeat_s:
                said_upstream = True
                log.info("dtk.no_heartbeat", why="no heartbeat in the shared directory: the "
                         "sidecar is not started yet, or an upstream one (which writes none)",
                         next=f"waiting for the done flag, at most {timeout_s:g}s")
            if now >= deadline:
                raise ProvisionError(f"the DTK sidecar did not finish the build within "
                                     f"{timeout_s:g}s (DTK_BUILD_TIMEOUT_SEC): no {done}; "
                                     "check the openshift-driver-toolkit-ctr container's log")
            if now >= next_progress:
                next_progress += progress_s
                log.info("dtk.waiting", elapsed_s=round(now - start, 1), phase=side.phase,
                         heartbeat_age_s=None if side.age_s is None else round(side.age_s, 1),
                         flag=str(done))
            watcher.wait(min(check, deadline - now, max(0.0, next_progress - now)))
    finally:
        finished.set()
        waker.join(STOP_CHECK_S * 2)
        watcher.close()


def _failure(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"{info.get('error', 'unknown error')}; its log: {info.get('log')}; last "
                f"lines:\n{info.get('tail', '')}")
    except (OSError, ValueError, AttributeError):
        return f"see {path}"
