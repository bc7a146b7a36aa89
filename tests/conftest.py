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
