"""Every environment variable, fuzzed (hypothesis), through `run --dry-run` and `run --once`
(issue 11): a bad value is exit 2 and one short line naming the variable, never a traceback; an
accepted one gives a run that does not crash.

The dry-run goes in-process (the CLI's `main`, its output captured) to try many values quickly;
the full runs are real processes, bounded by a deadline and stopped by SIGTERM if they wait (an
ENTRYPOINT_DEBUG sleep), on a node where nothing needs reloading.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mofed_lifecycle.cli import Seams, main
from mofed_lifecycle.config import SPECS
from mofed_lifecycle.sim.node import init_node, stop_kernel

from .conftest import SHARED_SCENARIOS

VARS = [s.var for s in SPECS]
# values that broke parsers before, or sit at the edges of every type
EDGES = ["", " ", "0", "1", "-1", "0.001", "1e10", "1e300", "9999999", "nan", "inf", "-inf",
         "²", "١", "0x10", "1_000", "true", "false", "yes", "No", "2", "/", "/run/x", "relative",
         "/run/../..", "a:b", ":", "::", "mlx5_core", "mlx5_core:ib_core", "a b", "$(reboot)",
         "-x", "x" * 300, "é", "name=value", "/tmp/x.prom", "25.07-0.9.7"]
VALUE = st.one_of(st.sampled_from(EDGES),
                  st.text(st.characters(blacklist_categories=("Cs",),
                                        blacklist_characters="\x00"), max_size=40))
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the node is module-scoped, shared on purpose
ENVS = st.dictionaries(st.sampled_from(VARS), VALUE, min_size=1, max_size=6)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fuzz") / "node"
    init_node(SHARED_SCENARIOS / "restart-no-reload.toml", root)
    yield root
    stop_kernel(root)


def clean_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in VARS}
    return {**base, "NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7", **env}


def check_refusal(code: int, stderr: str, env: dict[str, str]) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and len(lines[0]) <= 600, stderr[-2000:]
    assert lines[0].startswith("mofed-lifecycle: ")
    assert any(var in lines[0] for var in env), lines[0]  # it names the variable


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(env=ENVS)
def test_any_environment_is_refused_in_one_line_or_accepted_by_the_dry_run(node, env):
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, clean_env(env), clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--log-format", "json", "run", "--dry-run", "--root", str(node)],
                    Seams(in_process=True))  # the node's tools as calls: no process per modinfo
    stderr = err.getvalue()
    assert "Traceback" not in stderr
    if code == 2:
        check_refusal(code, stderr, env)
    else:
        assert code in (0, 1), stderr[-2000:]  # 1: the reload would be refused
        assert out.getvalue().startswith("decision: ")


@settings(max_examples=6, deadline=None, suppress_health_check=FIXTURE_OK)
@given(env=ENVS)
def test_an_accepted_environment_gives_a_run_that_does_not_crash(node, env):
    argv = [sys.executable, "-m", "mofed_lifecycle.cli", "--log-format", "json", "run", "--once",
            "--root", str(node)]
    p = subprocess.Popen(argv, env=clean_env(env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:  # waiting (ENTRYPOINT_DEBUG's sleep): a stop ends it
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr[-3000:]
    if p.returncode == 2:
        check_refusal(p.returncode, stderr, env)
    else:
        assert p.returncode in (0, 1), stderr[-3000:]
        assert stderr.splitlines()[-1].startswith("{"), stderr[-2000:]  # it logged its exit
