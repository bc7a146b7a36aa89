"""The pure provisioning decisions (provision/plan.py) and the inventory on real files."""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path

import pytest

from mofed_lifecycle.host.commands import Commands, CommandStopped, CommandTimeout
from mofed_lifecycle.host.paths import NodePaths
from mofed_lifecycle.provision.dtk import look_at_sidecar, wait_for_build
from mofed_lifecycle.provision.inventory import Inventory, ProvisionError, package_family
from mofed_lifecycle.provision.plan import (
    DTK_FAILED,
    BuildSpec,
    done_flag_name,
    dtk_env_text,
    entry_problem,
    install_args,
    parse_env_file,
    rhel_distro,
    sanitise_kernel,
    stale_entries,
    strip_kernel_flags,
)

SPEC = BuildSpec("5.15.0-91-generic", "25.07-0.9.7", "", False)


@pytest.mark.parametrize(("release", "label"), [
    ("5.14.0-427.22.1.el9_4.x86_64", "5.14.0-427.22.1.el9_4.x86_64"),
    ("6.8.0-45-generic", "6.8.0-45-generic"),
    ("5.14.0+rt/x~1", "5.14.0_rt_x_1"),
    ("-_.6.1.0-28+deb12.", "6.1.0-28_deb12"),
])
def test_the_kernel_directory_is_named_as_nfd_labels_it(release, label):
    assert sanitise_kernel(release) == label


def test_the_done_flag_is_upstreams_name():
    assert done_flag_name("25.07-0.9.7") == "dtk_done_compile_25_07_0_9_7"
    assert done_flag_name("24.10-1.1.4.0") == "dtk_done_compile_24_10_1_1_4_0"


def test_install_pl_gets_the_kernel_modules_only_flags_the_distro_and_the_appended_words():
    argv = install_args("/src/install.pl", "5.14.0-427.22.1.el9_4.x86_64",
                        "--with-nfsrdma '--extra=a b'", rhel_distro("5.14.0-427.22.1.el9_4.x86_64"))
    assert argv[:3] == ["/src/install.pl", "--kernel", "5.14.0-427.22.1.el9_4.x86_64"]
    assert {"--build-only", "--kernel-only", "--without-depcheck", "--without-dkms"} <= set(argv)
    assert argv[-4:] == ["--distro", "rhel9.4", "--with-nfsrdma", "--extra=a b"]
    assert rhel_distro("6.8.0-45-generic") is None and rhel_distro("4.18.0-553.el8.x86_64") == \
        "rhel8"


def test_the_fingerprint_changes_with_every_build_input():
    others = [BuildSpec("6.8.0-45-generic", "25.07-0.9.7", "", False),
              BuildSpec(SPEC.kernel, "25.10-1.2.8", "", False),
              BuildSpec(SPEC.kernel, SPEC.version, "--with-nfsrdma", False),
              BuildSpec(SPEC.kernel, SPEC.version, "", True)]
    assert len({SPEC.fingerprint(), *(o.fingerprint() for o in others)}) == 5
    assert "APPEND_DRIVER_BUILD_FLAGS=\n" in SPEC.fingerprint()  # upstream's keys are there


def test_an_entry_is_installed_only_when_whole_matching_and_unchanged():
    good = dict(has_dir=True, packages=["a.deb"], stored_checksum="sha256:x\n",
                actual_checksum="sha256:x", stored_buildconfig=SPEC.fingerprint())
    assert entry_problem(SPEC, **good) is None
    for change, words in [({"has_dir": False}, "cold cache"), ({"packages": []}, "no package"),
                          ({"stored_checksum": None}, "no checksum"),
                          ({"actual_checksum": "sha256:y"}, "do not match its checksum"),
                          ({"stored_buildconfig": None}, "older container"),
                          ({"stored_buildconfig": "KERNEL=other\n"}, "another configuration")]:
        assert words in (entry_problem(SPEC, **{**good, **change}) or "")


def test_cleanup_keeps_only_this_kernels_entry_for_this_version():
    listing = {"5.15.0-91-generic": ["25.07-0.9.7", "25.07-0.9.7.checksum",
                                     "25.07-0.9.7.buildconfig", "24.10-1.1.4",
                                     "24.10-1.1.4.checksum", ".25.07-0.9.7.partial-12"],
               "5.15.0-88-generic": ["25.07-0.9.7"]}
    assert stale_entries(listing, "5.15.0-91-generic", "25.07-0.9.7") == [
        "5.15.0-88-generic", "5.15.0-91-generic/.25.07-0.9.7.partial-12",
        "5.15.0-91-generic/24.10-1.1.4", "5.15.0-91-generic/24.10-1.1.4.checksum"]


def test_dtk_env_carries_upstreams_variables_and_quotes_what_a_shell_would_split(tmp_path):
    flags = "--with-nfsrdma '--x=a b' $(touch /tmp/pwned)"
    text = dtk_env_text(shared_dir="/mnt/shared/5.14.0-427.el9", version="25.07-0.9.7",
                        append_flags=flags, kernel="5.14.0-427.el9", heartbeat_s=10,
                        build_timeout_s=3600)
    env = parse_env_file(text)
    assert env["DTK_OCP_START_COMPILE_FLAG"] == "/mnt/shared/5.14.0-427.el9/dtk_start_compile"
    assert env["DTK_OCP_DONE_COMPILE_FLAG"].endswith("/dtk_done_compile_25_07_0_9_7")
    assert env["DTK_OCP_COMPILED_DRIVER_VER"] == env["NVIDIA_NIC_DRIVER_VER"] == "25.07-0.9.7"
    assert env["MOFED_LIFECYCLE_APPEND_FLAGS"] == flags and env["USE_DKMS"] == "false"
    # an upstream sidecar builds with these alone: the kernel and distro are in them, as
    # upstream's main container puts them; ours takes them out again
    assert env["APPEND_DRIVER_BUILD_FLAGS"] == f"{flags} --kernel 5.14.0-427.el9 --distro rhel9"
    assert strip_kernel_flags(env["APPEND_DRIVER_BUILD_FLAGS"]) == shlex.join(shlex.split(flags))
    # a real shell sourcing it gets the same value and runs nothing
    import subprocess

    env_file = tmp_path / "dtk.env"
    env_file.write_text(text)
    out = subprocess.run(["sh", "-c", f'. {shlex.quote(str(env_file))}; printf %s '
                          '"$MOFED_LIFECYCLE_APPEND_FLAGS"'], capture_output=True, text=True,
                         timeout=10)
    assert out.stdout == flags and not Path("/tmp/pwned").exists()


def test_an_inventory_entry_round_trips_and_a_changed_byte_is_caught(tmp_path):
    pkg = tmp_path / "build" / "mlnx-ofed-kernel-modules_25.07_amd64.deb"
    pkg.parent.mkdir()
    pkg.write_bytes(b"package bytes")
    inv = Inventory(tmp_path / "inventory", SPEC)
    assert "cold cache" in (inv.problem() or "")
    inv.store([pkg])
    assert inv.problem() is None and [p.name for p in inv.packages()] == [pkg.name]
    (inv.entry / pkg.name).write_bytes(b"package bytez")
    assert "do not match its checksum" in (inv.problem() or "")
    with pytest.raises(ProvisionError, match="no package"):
        inv.store([])
    assert "do not match its checksum" in (inv.problem() or "")  # refused before touching it


@pytest.mark.parametrize(("text", "family"), [
    ('ID=ubuntu\nID_LIKE=debian\n', "deb"), ('ID="rhel"\nID_LIKE="fedora"\n', "rpm"),
    ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "rpm"), ('ID=sles\n', "rpm")])
def test_the_package_family_comes_from_os_release(tmp_path, text, family):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(text)
    assert package_family(NodePaths.at(tmp_path)) == family


def test_an_unknown_os_is_refused_by_name(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text("ID=alpine\n")
    with pytest.raises(ProvisionError, match="ID='alpine'"):
        package_family(NodePaths.at(tmp_path))


# ---- the long-command runner (a real subprocess) ---------------------------------------------


def test_a_long_command_logs_progress_keeps_its_output_and_is_killed_at_its_deadline(tmp_path):
    log = tmp_path / "build.log"
    cmd = Commands({"PATH": "/usr/bin:/bin"})
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo step $i; sleep 0.1; done"
    assert cmd.run_logged(["sh", "-c", script], log_path=log, timeout_s=30,
                          stop=threading.Event(), progress_s=0.2, what="test") == 0
    assert log.read_text().splitlines()[-1] == "step 10"
    with pytest.raises(CommandTimeout, match="did not finish within 0.3s"):
        cmd.run_logged(["sh", "-c", "echo started; exec sleep 30"], log_path=log,
                       timeout_s=0.3, stop=threading.Event(), progress_s=0.1, what="test")
    assert log.read_text() == "started\n"


def test_a_stop_request_kills_the_whole_process_group(tmp_path):
    stop = threading.Event()
    pidfile = tmp_path / "child.pid"
    cmd = Commands({"PATH": "/usr/bin:/bin"})
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(CommandStopped):
        cmd.run_logged(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
                       log_path=tmp_path / "x.log", timeout_s=30, stop=stop, progress_s=1,
                       what="test")
    child = int(pidfile.read_text())
    assert _gone(child)  # the group got SIGTERM (a zombie waits for init to reap it)


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.01)  # polling /proc under a deadline: no event says a process ended
    return False


# ---- the DTK wait on real files --------------------------------------------------------------


def test_the_done_flag_is_noticed_by_inotify_within_milliseconds(tmp_path):
    spec = BuildSpec("5.14.0-427.el9", "25.07-0.9.7", "", False)
    flag = tmp_path / done_flag_name(spec.version)
    written: list[float] = []

    def write() -> None:
        written.append(time.time())
        flag.write_text("done\n")

    threading.Timer(0.5, write).start()
    noticed = wait_for_build(tmp_path, spec, timeout_s=10, heartbeat_s=60, progress_s=30,
                             stop=threading.Event())
    # the wait's own timer is 15 s here (a quarter of the heartbeat): only an event can wake it
    assert noticed - written[0] < 1.0


def test_a_build_failure_reported_by_the_sidecar_ends_the_wait_with_its_tail(tmp_path):
    spec = BuildSpec("5.14.0-427.el9", "25.07-0.9.7", "", False)
    (tmp_path / DTK_FAILED).write_text('{"error": "install.pl exited 1", "log": "/x/dtk.log", '
                                       '"tail": "make: *** Error 1"}')
    with pytest.raises(ProvisionError, match=r"(?s)install.pl exited 1.*Error 1"):
        wait_for_build(tmp_path, spec, timeout_s=10, heartbeat_s=1, progress_s=30,
                       stop=threading.Event())
    assert look_at_sidecar(tmp_path).beating is False


# ---- the sidecar's entry point, as the DTK image would run it --------------------------------


def _prepared(tmp_path: Path) -> Path:
    from mofed_lifecycle.provision.dtk import prepare

    src = tmp_path / "src"
    src.mkdir()
    (src / "install.pl").write_text("#!/bin/sh\nexit 0\n")
    shared = tmp_path / "shared" / "5.14.0-427.el9"
    prepare(shared, src, BuildSpec("5.14.0-427.el9", "25.07-0.9.7", "", False),
            heartbeat_s=10, build_timeout_s=60)
    return shared


def _interpreter(tmp_path: Path, name: str) -> Path:
    """A Python without this venv's site-packages: only what the launcher gives it (pylib/)."""
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    py = bindir / name
    py.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    py.chmod(0o755)
    return bindir


def _tools(tmp_path: Path) -> Path:
    """Only what the launcher needs besides Python (no python3 of this machine on PATH)."""
    import shutil

    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    for name in ("dirname", "ln", "sh"):
        (tools / name).symlink_to(shutil.which(name) or f"/bin/{name}")
    return tools


def test_the_sidecars_entry_point_runs_the_copied_package_on_a_bare_python(tmp_path):
    import json
    import signal
    import subprocess

    shared = _prepared(tmp_path)
    path = f"{_interpreter(tmp_path, 'python3.11')}:{_tools(tmp_path)}"
    r = subprocess.run(["sh", str(shared / "entrypoint"), "--version"], capture_output=True,
                       text=True, timeout=30, env={"PATH": path})
    assert r.returncode == 0 and r.stdout.startswith("mofed-lifecycle "), r.stderr
    # what the operator's sidecar runs: the script at the top of the volume finds this kernel's
    # dtk.env, and `dtk-build` takes the start flag there (this host has no headers for that
    # kernel: the build is refused by name, the sidecar stays up until SIGTERM)
    side = subprocess.Popen(["sh", str(shared.parent / "dtk_nic_driver_build.sh")],
                            env={"PATH": path}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    beat = shared / "dtk_heartbeat.json"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
            beat.exists() and json.loads(beat.read_text())["phase"] == "failed"):
        time.sleep(0.02)  # polling a file under a deadline
    side.send_signal(signal.SIGTERM)
    _out, err = side.communicate(timeout=20)
    assert side.returncode == 0, err[-2000:]
    failed = json.loads((shared / "dtk_build_failed.json").read_text())
    assert "the kernel headers for 5.14.0-427.el9" in failed["error"]
    assert not (shared / "dtk_start_compile").exists()  # taken: the main container asks again


def test_without_a_python_311_the_entry_point_asks_dnf_for_one_then_says_what_is_missing(
        tmp_path):
    import subprocess

    shared = _prepared(tmp_path)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    py = _interpreter(tmp_path, "python3.11") / "python3.11"
    dnf = stubs / "dnf"  # "installs" python3.11 onto PATH
    dnf.write_text(f"#!/bin/sh\necho \"dnf $*\" >> {tmp_path}/dnf.log\nln -s {py} {stubs}/"
                   "python3.11\n")
    dnf.chmod(0o755)
    env = {"PATH": f"{stubs}:{_tools(tmp_path)}"}
    r = subprocess.run(["sh", str(shared / "entrypoint"), "--version"], capture_output=True,
                       text=True, timeout=30, env=env)
    assert r.returncode == 0 and (tmp_path / "dnf.log").read_text() == \
        "dnf install -y python3.11\n", r.stderr
    (stubs / "python3.11").unlink()
    dnf.unlink()
    r = subprocess.run(["sh", str(shared / "entrypoint"), "--version"], capture_output=True,
                       text=True, timeout=30, env=env)
    assert r.returncode == 1 and "no Python 3.11 or newer in this image" in r.stderr
