"""The command line as an operator meets it: help that teaches, exit codes, one-line errors, logs.

Every case runs the real `mofed-lifecycle` entry point as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mofed_lifecycle import __version__
from mofed_lifecycle.log import Transitions, configure_logging, get_logger
from mofed_lifecycle.sim.node import stop_kernel

from .conftest import SCENARIOS

ENV = {**os.environ, "NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", *args],
                          env=env or ENV, capture_output=True, text=True, timeout=60)


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mofed-lifecycle {__version__}"


@pytest.mark.parametrize("args,teaches", [
    ((), ["run", "peermem", "sim", "config", "exit codes", "--root"]),
    (("run",), ["--root", "--once", "--dry-run", "environment variables", "exit codes"]),
    (("peermem",), ["--once", "--timeout", "readiness marker"]),
    (("config",), ["--markdown", "secrets"]),
    (("sim",), ["init", "state", "run", "examples:"]),
    (("sim", "init"), ["SCENARIO", "--root", "--force"]),
    (("sim", "run"), ["--report", "timeline"]),
])
def test_help_explains_each_command(args, teaches):
    r = cli(*args, "--help")
    assert r.returncode == 0
    for word in teaches:
        assert word in r.stdout, f"`{' '.join(args)} --help` does not mention {word!r}"


@pytest.mark.parametrize("args,says", [
    (("frobnicate",), "invalid choice"),
    (("run", "--root", "/no/such/dir"), "is not a directory"),
    (("sim", "state", "--root", "/tmp"), "is not a simulated node"),
    (("sim", "init", "/no/such.toml", "--root", "/tmp/x-never"), "cannot read scenario"),
    (("sim", "init", str(SCENARIOS / "tiny-eth.toml"), "--root", str(SCENARIOS / "tiny-eth.toml")),
     "is a file"),
])
def test_bad_usage_is_exit_2_with_one_line_and_no_traceback(args, says):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr


def test_a_broken_scenario_names_the_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[driver]\nloaded_version = "24.04"\ninstalled_version = "25.07"\n'
                   '[[pf]]\npci = "0000:08:00.0"\nname = "enp8s0f0np0"\nmtu = "big"\n')
    r = cli("sim", "init", str(bad), "--root", str(tmp_path / "n"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mofed-lifecycle: {bad}: [[pf]] #1.mtu: expected int, got 'big'"]
    bad.write_text("[node\n")
    r = cli("sim", "init", str(bad), "--root", str(tmp_path / "n"))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr


def test_sim_init_refuses_a_non_empty_directory_and_force_rebuilds_a_node(tmp_path: Path):
    (tmp_path / "precious").write_text("keep me")
    r = cli("sim", "init", str(SCENARIOS / "tiny-eth.toml"), "--root", str(tmp_path))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "precious").read_text() == "keep me"
    node = tmp_path / "node"
    try:
        tiny = str(SCENARIOS / "tiny-eth.toml")
        assert cli("sim", "init", tiny, "--root", str(node)).returncode == 0
        r = cli("sim", "init", tiny, "--root", str(node))
        assert r.returncode == 2 and "--force" in r.stderr
        r = cli("sim", "init", tiny, "--root", str(node), "--force")
        assert r.returncode == 0 and "1 PF(s), 4 VF(s)" in r.stdout
    finally:
        stop_kernel(node)


def test_peermem_gives_up_at_its_deadline_naming_what_is_missing(tmp_path: Path):
    assert cli("peermem", "--timeout", "0").returncode == 2  # a usage error, one line
    r = cli("peermem", "--root", str(tmp_path), "--once", "--timeout", "0.3")
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("mofed-lifecycle: nvidia-peermem not loaded "
                                                "after 0.3s: the NIC driver's readiness marker")


def test_logs_are_json_lines_with_event_names_off_a_tty(tmp_path: Path):
    r = cli("run", "--root", str(tmp_path), "--once")  # an empty root: inspect fails at once
    assert r.returncode == 1
    events = [json.loads(line) for line in r.stderr.splitlines()]  # every line is an event
    loaded = next(e for e in events if e["event"] == "config.loaded")
    assert loaded["component"] == "cli" and loaded["level"] == "info" and "timestamp" in loaded
    assert loaded["driver_version"] == "25.07-0.9.7"
    failed = next(e for e in events if e["event"] == "step.failed")
    assert failed["state"] == "inspect" and "proc/modules" in failed["error"] and failed["next"]
    assert [e["state"] for e in events if e["event"] == "state.entered"] == [
        "lock", "provision", "inspect", "failed"]


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_lines_on_a_tty_and_transitions_carry_elapsed_seconds():
    out = FakeTty()
    configure_logging(stream=out)
    clock = iter([100.0, 100.5, 103.0])
    t = Transitions(get_logger("lifecycle"), clock=lambda: next(clock))
    t.enter("inspect")
    assert t.enter("decide", reload=True) == 3.0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and not lines[0].lstrip().startswith("{")
    assert "state.entered" in lines[1] and "state=decide" in lines[1]
    assert "elapsed_s=3.0" in lines[1] and "previous_s=2.5" in lines[1]
    out = io.StringIO()
    configure_logging(stream=out)  # not a TTY: JSON
    Transitions(get_logger("lifecycle"), clock=lambda: 1.0).enter("ready")
    event = json.loads(out.getvalue())
    assert event["event"] == "state.entered" and event["elapsed_s"] == 0.0
    configure_logging()


def test_no_production_module_knows_the_simulator():
    """The seam is chosen once, at the edge (cli.py): nothing else imports `sim` or looks for a
    simulated node's files (a `.sim/` under `/` must never switch a real node's backend)."""
    import ast

    package = Path(__file__).resolve().parent.parent / "mofed_lifecycle"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "sim" or rel == Path("cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value.strip("/") == ".sim" or ".sim/" in node.value
                    or "mofed_lifecycle.sim" in node.value):
                offenders.append(f"{rel}: looks for {node.value!r}")  # or imports it by name
            offenders += [f"{rel}: imports {n}" for n in names
                          if n.lstrip(".").split(".")[0] == "sim" or ".sim" in n
                          or n.startswith("mofed_lifecycle.sim")]
    assert offenders == []


def test_a_run_shares_the_headers_through_the_nodes_own_mount(tiny):
    """mount-headers runs `mount --rbind` with the node's tools (the simulated node records the
    bind instead of asking the daemon whether it is simulated)."""
    from .test_lifecycle import lifecycle

    root, _k = tiny
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    src, target = (root / ".sim/mounts").read_text().split()
    assert src == str(root / "usr/src") and target == str(root / "run/mellanox/drivers/usr/src")
    assert "/run/mellanox/drivers/usr/src" in (root / "proc/self/mountinfo").read_text()
