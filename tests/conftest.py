"""Shared fixtures: simulated nodes built from scenario files, their kernel stopped afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mofed_lifecycle.sim.client import KernelClient
from mofed_lifecycle.sim.kernel_thread import ThreadKernel
from mofed_lifecycle.sim.node import init_node, stop_kernel

os.environ.setdefault("MOFED_SIM_IDLE_EXIT_S", "60")  # no kernel process outlives a test run long
# the tests' nodes run at time_scale 0.01: their udev sees a blacklist after 0.02 s, not 3 s
os.environ.setdefault("BLACKLIST_SETTLE_SEC", "0.05")

# The suite writes ~90,000 small files and thousands of fsyncs (simulated sysfs trees, journals):
# on this machine kind's virtual disk that left it stalled on I/O (a quarter of its time, and the
# wall time varying from 50 to 75 s). Where the machine has a RAM file system, tmp_path lives there.
RAM_TMP = Path("/dev/shm")
RAM_TMP_MIN_FREE = 2 << 30
ON_DISK = "MOFED_TEST_TMP_ON_DISK"  # set (to anything) to keep pytest's default temporary root


def _ram_tmp() -> Path | None:
    """/dev/shm if it is a writable tmpfs with room to spare, else None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        st = os.statvfs(RAM_TMP)
    except OSError:
        return None
    tmpfs = any(f[1:3] == [str(RAM_TMP), "tmpfs"] for f in map(str.split, mounts) if len(f) > 2)
    roomy = st.f_bavail * st.f_frsize >= RAM_TMP_MIN_FREE
    return RAM_TMP if tmpfs and roomy and os.access(RAM_TMP, os.W_OK) else None


def pytest_configure(config: pytest.Config) -> None:
    """tmp_path on a RAM file system unless told otherwise (--basetemp, PYTEST_DEBUG_TEMPROOT, or
    MOFED_TEST_TMP_ON_DISK); pytest's numbered directories, locks and retention stay as they are.
    xdist's workers get their base directory from the controller, which decides here."""
    if config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or ON_DISK in os.environ:
        return
    ram = _ram_tmp()
    if ram is not None:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(ram)


def pytest_report_header(config: pytest.Config) -> str:
    where = os.environ.get("PYTEST_DEBUG_TEMPROOT")
    return (f"tmp_path under {where} (a RAM file system; {ON_DISK}=1 for the disk)" if where
            else "tmp_path under the default temporary directory")

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
# The team's shared scenarios (../shared/scenarios beside the project); a clone without ../shared
# uses the copy in tests/scenarios/shared, which test_scenarios_ground_truth keeps identical.
SHARED_BESIDE = HERE.parent.parent / "shared" / "scenarios"
SHARED_COPY = SCENARIOS / "shared"
SHARED_SCENARIOS = SHARED_BESIDE if SHARED_BESIDE.is_dir() else SHARED_COPY


def shared_scenarios() -> list[Path]:
    return sorted(SHARED_SCENARIOS.glob("*.toml"))


NodeFactory = Callable[..., tuple[Path, KernelClient]]


def node_factory(tmp_path: Path, *, in_thread: bool) -> Iterator[NodeFactory]:
    made: list[tuple[Path, KernelClient, ThreadKernel | None]] = []

    def make(scenario: str | Path, name: str = "node") -> tuple[Path, KernelClient]:
        path = Path(scenario) if isinstance(scenario, Path) else None
        if path is None:
            path = tmp_path / f"{name}.toml"
            path.write_text(str(scenario))
        root = tmp_path / name
        init_node(path, root)
        kernel = ThreadKernel(root) if in_thread else None
        client = KernelClient(root)
        made.append((root, client, kernel))
        return root, client

    yield make
    for root, client, kernel in made:
        client.close()
        if kernel is not None:
            kernel.stop()
        else:
            stop_kernel(root)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """make_node(scenario_path_or_toml_text) -> (root, client) for a fresh simulated node, its
    kernel served from a thread of the test process (`sim.kernel_thread`; test_sim_kernel tests
    the kernel process itself)."""
    yield from node_factory(tmp_path, in_thread=True)


@pytest.fixture
def tiny(make_node: NodeFactory) -> tuple[Path, KernelClient]:
    return make_node(SCENARIOS / "tiny-eth.toml")
