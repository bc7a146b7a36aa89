"""`mofed-lifecycle dtk-build`: the OpenShift driver-toolkit sidecar's side of the hand-off.

It watches `<DTK_OCP_NIC_SHARED_DIR>/<sanitised kernel>/` for `dtk_start_compile` by inotify,
builds the sources the main container put there with their install.pl, creates
`dtk_done_compile_<version>` and removes the start flag (upstream's protocol, so an upstream main
container works with it too), then stays up for the next start flag until SIGTERM, which also
stops a build under way (install.pl is killed; the start flag stays, so a restarted sidecar builds
again). While it runs it holds `dtk_sidecar.lock` and rewrites `dtk_heartbeat.json` every
HEARTBEAT_INTERVAL_SEC, which the main container checks (dtk.py); a failed build is reported in
`dtk_build_failed.json` and the start flag removed, so the main container's retry asks again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ..config_values import seconds_in
from ..host.commands import Commands, CommandStopped, CommandTimeout
from ..host.files import atomic_write_json, atomic_write_text, read_text_or_empty
from ..host.inotify import FileWatcher
from ..host.paths import NodePaths
from ..log import get_logger
from ..signals import StopSignals
from .inventory import ProvisionError, kernel_release
from .plan import (
    DTK_BUILDCONFIG,
    DTK_ENV,
    DTK_FAILED,
    DTK_HEARTBEAT,
    DTK_LOCK,
    DTK_PREPARE_LOCK,
    START_FLAG,
    done_flag_name,
    install_args,
    parse_env_file,
    rhel_distro,
    sanitise_kernel,
    strip_kernel_flags,
    tail,
)
from .sources import missing_prerequisites

DEFAULT_SHARED = "/mnt/shared-nvidia-nic-driver-toolkit"
# what upstream's sidecar installs before a build: install.pl's perl, and the build's tools
DTK_BUILD_PACKAGES = ("perl", "ethtool", "autoconf", "pciutils", "automake", "libtool",
                      "python3-devel")
DNF_TIMEOUT_S = 900.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class SidecarUsage(ValueError):
    """A bad variable: one line, exit 2."""


def _seconds(env: Mapping[str, str], name: str, default: str, lo: float, hi: float) -> float:
    text = (env.get(name) or default).strip()
    try:
        return seconds_in(lo, hi)(text)
    except ValueError as e:
        raise SidecarUsage(f"{name}={text!r}: {e}") from None


class Sidecar:
    def __init__(self, paths: NodePaths, env: Mapping[str, str], commands: Commands) -> None:
        self.paths, self.env, self.commands = paths, dict(env), commands
        self.log = get_logger("dtk-build")
        self.kernel = env.get("MOFED_LIFECYCLE_DTK_KERNEL") or kernel_release(paths)
        if env.get("DTK_OCP_START_COMPILE_FLAG"):  # started by the script that read dtk.env
            self.shared = paths.resolve(env["DTK_OCP_START_COMPILE_FLAG"]).parent
        else:
            base = env.get("DTK_OCP_NIC_SHARED_DIR") or DEFAULT_SHARED
            self.shared = paths.resolve(base) / sanitise_kernel(self.kernel)
        self.heartbeat_s = _seconds(env, "HEARTBEAT_INTERVAL_SEC", "10", 0.05, 3600)
        self.stop = threading.Event()
        self.phase = "starting"
        self.builds = 0
        self.fingerprint: str | None = None  # of the build under way (dtk.buildconfig's digest)

    # ---- heartbeat and lock ---------------------------------------------------------------------
    def beat(self) -> None:
        try:
            atomic_write_json(self.shared / DTK_HEARTBEAT, {
                "pid": os.getpid(), "time": time.time(), "phase": self.phase,
                "interval_s": self.heartbeat_s, "builds": self.builds,
                "fingerprint": self.fingerprint})
        except OSError as e:
            self.log.warning("heartbeat.unwritten", error=str(e))

    def _beat_loop(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            self.beat()

    def set_phase(self, phase: str, **detail: Any) -> None:
        self.phase = phase
        self.beat()
        self.log.info(f"dtk.{phase}", shared_dir=str(self.shared), **detail)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        self.shared.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.shared / DTK_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log.error("dtk.lock_held", lock=str(self.shared / DTK_LOCK),
                           next="another dtk-build runs on this shared directory; stop it first")
            os.close(lock_fd)
            return EXIT_FAILED
        threading.Thread(target=self._beat_loop, daemon=True, name="dtk-heartbeat").start()
        self.set_phase("waiting", start_flag=str(self.shared / START_FLAG), kernel=self.kernel)
        try:
            while not self.stop.is_set():
                if not self.wait_for_start():
                    break
                with self.building():  # the main container fills the directory first
                    if (self.shared / START_FLAG).exists() and not self.stop.is_set():
                        self.build_once()
        finally:
            self.phase = "stopped"
            self.beat()
            os.close(lock_fd)  # let go last: a main container sees "stopped", not "died"
        self.log.info("dtk.exit", builds=self.builds)
        return EXIT_OK

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """The prepare lock, shared, for the whole build: waits while the main container holds
        it (it is filling the directory), and keeps it from preparing again mid-build."""
        fd = os.open(self.shared / DTK_PREPARE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.stop.wait(0.05):  # the main container fills it: seconds at most
                        break
            yield
        finally:
            os.close(fd)

    def wait_for_start(self) -> bool:
        flag = self.shared / START_FLAG
        watcher = FileWatcher([flag])
        try:
            while not flag.exists():
                if self.stop.is_set():
                    return False
                watcher.wait(0.2)  # inotify wakes it at once; 0.2 s bounds a stop request
            return not self.stop.is_set()
        finally:
            watcher.close()

    def build_once(self) -> None:
        env_file = parse_env_file(read_text_or_empty(self.shared / DTK_ENV))
        version = env_file.get("DTK_OCP_COMPILED_DRIVER_VER") or env_file.get(
            "NVIDIA_NIC_DRIVER_VER") or ""
        if "MOFED_LIFECYCLE_APPEND_FLAGS" in env_file:  # ours: the user's flags alone
            flags = env_file["MOFED_LIFECYCLE_APPEND_FLAGS"]
        else:  # an upstream main container's, with its --kernel and --distro in them
            flags = strip_kernel_flags(env_file.get("APPEND_DRIVER_BUILD_FLAGS", ""))
        nfsrdma = env_file.get("ENABLE_NFSRDMA", "false") == "true"
        timeout_s = float(env_file.get("BUILD_TIMEOUT_SEC") or 3600)
        config = read_text_or_empty(self.shared / DTK_BUILDCONFIG)
        self.fingerprint = hashlib.sha256(config.encode()).hexdigest()[:16] if config else None
        source = self.shared / f"MLNX_OFED_SRC-{version}"
        log_path = self.shared / "dtk_build.log"
        started = time.monotonic()
        self.set_phase("building", version=version, sources=str(source), log=str(log_path))
        try:
            if not version:
                raise ProvisionError(f"{self.shared / DTK_ENV} names no driver version "
                                     "(DTK_OCP_COMPILED_DRIVER_VER)")
            if missing_prerequisites(self.paths, source, self.kernel, self.commands):
                self.install_build_tools()  # what upstream's sidecar installs in the DTK image
            if missing := missing_prerequisites(self.paths, source, self.kernel, self.commands):
                raise ProvisionError("cannot build the driver, missing: " + "; ".join(missing))
            argv = install_args(str(source / "install.pl"), self.kernel, flags,
                                rhel_distro(self.kernel), nfsrdma=nfsrdma, family="rpm",
                                dtk=True)
            rc = self.commands.run_logged(argv, log_path=log_path, timeout_s=timeout_s,
                                          stop=self.stop, progress_s=min(30.0, self.heartbeat_s
                                                                         * 3),
                                          what="build the driver (DTK)", cwd=source)
            if rc != 0:
                raise ProvisionError(f"install.pl exited {rc}")
        except CommandStopped:
            self.log.warning("dtk.build_stopped", why="SIGTERM", next="the start flag stays: "
                             "a restarted sidecar builds again")
            return
        except (ProvisionError, CommandTimeout, OSError) as e:
            atomic_write_json(self.shared / DTK_FAILED, {
                "error": str(e), "log": str(log_path), "tail": tail(read_text_or_empty(log_path)),
                "time": time.time(), "version": version})
            (self.shared / START_FLAG).unlink(missing_ok=True)
            self.set_phase("failed", error=str(e), log=str(log_path),
                           next="the main container reports it and asks again at its re-check")
            return
        self.builds += 1
        (self.shared / DTK_FAILED).unlink(missing_ok=True)
        atomic_write_text(self.shared / done_flag_name(version), f"{time.time():.6f}\n")
        (self.shared / START_FLAG).unlink(missing_ok=True)
        self.set_phase("done", version=version, build_s=round(time.monotonic() - started, 3),
                       done_flag=done_flag_name(version))

    def install_build_tools(self) -> None:
        """The DTK image is Red Hat's: install.pl's perl and the build's tools come from dnf,
        as upstream's sidecar installs them. Nothing to do (and said) without dnf."""
        path = self.commands.env.get("PATH", os.defpath)
        if shutil.which("dnf", path=path) is None:
            self.log.info("dtk.no_dnf", why="build tools are missing and there is no dnf to "
                          "install them with: the build is refused with what is missing")
            return
        argv = ["dnf", "install", "-y", *DTK_BUILD_PACKAGES]
        try:
            res = self.commands.run(argv, timeout_s=DNF_TIMEOUT_S,
                                    what="install the build's tools in the DTK image")
        except (OSError, CommandTimeout) as e:
            self.log.error("dtk.tools_not_installed", error=str(e))
            return
        if not res.ok:
            self.log.error("dtk.tools_not_installed", rc=res.returncode,
                           stderr=res.stderr.strip()[-500:],
                           next="check the DTK image's repositories (dnf repolist)")

    def request_stop(self, signum: int) -> None:
        self.log.info("signal.received", signal=signal.Signals(signum).name, phase=self.phase)
        self.stop.set()


def run_sidecar(paths: NodePaths, env: Mapping[str, str], commands: Commands) -> int:
    try:
        sidecar = Sidecar(paths, env, commands)
    except SidecarUsage as e:
        print(f"mofed-lifecycle: {e}")
        return EXIT_USAGE
    signals = StopSignals(sidecar.request_stop, name="dtk-signals").install()
    try:
        return sidecar.run()
    finally:
        signals.uninstall()


