"""Every scenario becomes the node it describes: `sim init` + `sim state`, run as the real CLI.

For each shared scenario (`../shared/scenarios/*.toml`, required) and each example shipped in the
package (`mofed_lifecycle/sim/examples/*.toml`), the ground truth printed by `sim state` is compared
with what the scenario file says. Expected values are computed here from the raw TOML (tomllib) and
the rules of `shared/scenario-format.md` (kernel defaults, VF addresses, "vf.all" merged under
"vf.N"), never by the simulator's own parser, so a parser bug cannot hide behind itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mofed_lifecycle.sim
from mofed_lifecycle.sim.node import stop_kernel

from .conftest import SHARED_BESIDE, SHARED_COPY, SHARED_SCENARIOS, shared_scenarios
from .inprocess import run_cli

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(mofed_lifecycle.sim.__file__).resolve().parent / "examples"
EXPECTED_EXAMPLES = {
    "upgrade-50vf-eth.toml", "dgx-ib-8x8.toml", "restart-no-reload.toml", "storage-holder.toml",
    "peermem-race.toml", "vfio-and-switchdev.toml",
}
READY_MARKER = "run/mellanox/drivers/.driver-ready"
INBOX = "inbox"
ZERO_GUID = "00:00:00:00:00:00:00:00"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
GUID_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}$")
# The stack modules the contract says exist whether listed or not (srcversions derived if not).
STACK = ("mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs", "ib_umad", "ib_ipoib", "ib_cm", "rdma_cm",
         "rdma_ucm")
# Kernel defaults of the IFLA_VF_* settings (what a VF has when the scenario says nothing).
VF_DEFAULTS: dict[str, Any] = {
    "trust": False, "spoofchk": True, "link_state": "auto", "vlan": 0, "qos": 0,
    "min_tx_rate": 0, "max_tx_rate": 0,
}
REPORT_KEYS = {"scenario", "time_scale", "outcome", "reloaded", "phases", "restore_limit_s", "vfs",
               "state_before", "state_after"}


def all_scenarios() -> list[Path]:
    return shared_scenarios() + sorted(EXAMPLES.glob("*.toml"))


def scenario_id(path: Path) -> str:
    return f"{'shared' if path.parent == SHARED_SCENARIOS else 'example'}:{path.stem}"


# ---- the CLI, as a subprocess --------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mofed_lifecycle.cli", *args], cwd=PROJECT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (f"{r.args} exited {r.returncode}\n"
                               f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[[str | Path], tuple[Path, dict[str, Any]]]]:
    """node(scenario) -> (root, ground truth) by `sim init` + `sim state` (the command line, run
    in this process: test_cli covers the executable); kernels stopped after."""
    roots: list[Path] = []

    def make(scenario: str | Path) -> tuple[Path, dict[str, Any]]:
        root = tmp_path / f"node{len(roots)}"
        roots.append(root)
        ok(run_cli(["sim", "init", str(scenario), "--root", str(root)]))
        out = ok(run_cli(["sim", "state", "--root", str(root)])).stdout
        try:
            return root, json.loads(out)
        except json.JSONDecodeError as e:
            raise AssertionError(f"`sim state` did not print JSON ({e}):\n{out}") from None

    yield make
    for root in roots:
        stop_kernel(root)


# ---- what a scenario file says, derived independently ------------------------------------------


def rid(pci: str) -> int:
    """PCI routing ID (bus, device, function) of a domain:bus:dev.fn address."""
    bus, devfn = pci.split(":")[1:]
    dev, fn = devfn.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16)


def pci_at(domain: str, r: int) -> str:
    return f"{domain}:{r >> 8 & 0xFF:02x}:{r >> 3 & 0x1F:02x}.{r & 7}"


def expected_vf_pcis(pfs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """ConnectX VF addresses: first VF at the PF's routing ID + 2, stride 1. The ports of one
    adapter (same domain:bus:device) share the range: each next port's VFs follow the previous
    port's `totalvfs` slots (default: max(127, numvfs), the simulator's)."""
    out: dict[str, list[str]] = {}
    adapters: dict[str, list[dict[str, Any]]] = {}
    for pf in pfs:
        adapters.setdefault(pf["pci"].lower().rsplit(".", 1)[0], []).append(pf)
    for ports in adapters.values():
        ports.sort(key=lambda p: rid(p["pci"].lower()))
        first = rid(ports[0]["pci"].lower()) + 2
        for pf in ports:
            pci, n = pf["pci"].lower(), pf.get("numvfs", 0)
            out[pci] = [pci_at(pci.split(":")[0], first + i) for i in range(n)]
            first += pf.get("totalvfs", max(127, n))
    return out


def vf_settings(pf: dict[str, Any], index: int) -> dict[str, Any]:
    """`vf.all` with `vf.<index>` over it (TOML dotted keys: pf["vf"]["all"], pf["vf"]["3"])."""
    tables = pf.get("vf", {})
    return {**tables.get("all", {}), **tables.get(str(index), {})}


def peer_exporter(version: str) -> str | None:
    """ib_uverbs exports the peer-memory API from 24.07 on, ib_core before, nothing in inbox."""
    if version == INBOX:
        return None
    m = re.match(r"(\d+)\.(\d+)", version)
    return "ib_uverbs" if m and (int(m[1]), int(m[2])) >= (24, 7) else "ib_core"


def delay_bounds(spec: Any, default: float) -> tuple[float, float]:
    """(lo, hi) of a delay spec: a number, [lo, hi], or one value per VF index."""
    if isinstance(spec, int | float):
        return float(spec), float(spec)
    vals = [float(x) for x in (spec or [default])]
    return min(vals), max(vals)


def is_laa_unicast(mac: str) -> bool:
    first = int(mac.split(":")[0], 16)
    return bool(MAC_RE.match(mac)) and first & 0x02 == 0x02 and first & 0x01 == 0


def canon(module: str) -> str:
    return module.replace("-", "_")


# ---- the checks ----------------------------------------------------------------------------------


def check_modules(sc: dict[str, Any], gt: dict[str, Any], root: Path) -> None:
    drv = sc["driver"]
    mods = gt["modules"]
    assert gt["driver"]["loaded_version"] == drv["loaded_version"]
    for m, src in drv.get("loaded", {}).items():
        assert m in mods or canon(m) in mods, f"{m} listed in [driver].loaded but not loaded"
        assert mods[canon(m)]["srcversion"] == src, f"{m}: srcversion"
    for m in STACK:
        assert m in mods, f"stack module {m} not loaded"
        if drv["loaded_version"] == INBOX and m not in drv.get("loaded", {}):
            # unversioned: no /sys/module/<m>/srcversion (contract version 2)
            assert mods[m]["srcversion"] is None, (m, mods[m])
            assert not (root / "sys/module" / m / "srcversion").exists(), m
        else:
            assert re.fullmatch(r"[0-9A-F]{23,24}", mods[m]["srcversion"]), (m, mods[m])
    assert ("mlx_compat" in mods) == (drv["loaded_version"] != INBOX)  # inbox: no mlx_compat
    assert "mlx5_ib" in mods["mlx5_core"]["holders"] and "mlx5_ib" in mods["ib_core"]["holders"]
    for m, info in mods.items():
        assert info["refcnt"] >= len(info["holders"]), m
        assert all(h in mods for h in info["holders"]), m
    for extra in drv.get("extra_modules", []):
        name = canon(extra["name"])
        assert name in mods, f"extra module {name} not loaded"
        for held in extra.get("holds", []):
            assert name in mods[canon(held)]["holders"], f"{name} not among {held}'s holders"
    gpu = sc.get("gpu", {})
    if gpu.get("peermem_loaded", False):
        pm = mods.get("nvidia_peermem")
        assert pm is not None, "[gpu] peermem_loaded but nvidia_peermem is not loaded"
        assert pm["refcnt"] == gpu.get("peermem_users", 0)
        exporter = peer_exporter(drv["loaded_version"])
        if exporter:
            assert "nvidia_peermem" in mods[exporter]["holders"], "it must hold the exporter"
    else:
        assert "nvidia_peermem" not in mods
    # What `modinfo` reports is the installed (container) driver.
    installed = {canon(m): s for m, s in drv.get("installed", {}).items()}
    if installed:
        r = ok(subprocess.run([str(root / ".sim/bin/modinfo"), "-F", "srcversion", *installed],
                              capture_output=True, text=True, timeout=30))
        assert r.stdout.split() == list(installed.values())
        r = ok(subprocess.run([str(root / ".sim/bin/modinfo"), "-F", "version", "mlx5_core"],
                              capture_output=True, text=True, timeout=30))
        assert r.stdout.strip() == drv["installed_version"]


def check_node_files(gt: dict[str, Any], root: Path) -> None:
    assert gt["blacklist_files"] == []
    assert gt["markers"].get(READY_MARKER) is False
    assert not (root / READY_MARKER).exists()


def check_pfs(sc: dict[str, Any], gt: dict[str, Any], root: Path) -> None:
    pfs = sc.get("pf", [])
    assert set(gt["pfs"]) == {pf["pci"].lower() for pf in pfs}
    vf_pcis = expected_vf_pcis(pfs)
    explicit_macs: set[str] = set()
    derived_macs: list[str] = []
    derived_guids: list[str] = []
    for pf in pfs:
        pci = pf["pci"].lower()
        got = gt["pfs"][pci]
        ib = pf.get("link", "eth") == "ib"
        numvfs = pf.get("numvfs", 0)
        assert got["name"] == pf["name"]
        assert got["link"] == ("ib" if ib else "eth")
        assert got["mtu"] == pf.get("mtu", 2044 if ib else 1500)
        assert got["up"] is pf.get("up", True)
        assert got["eswitch"] == pf.get("eswitch", "legacy")
        assert got["numvfs"] == numvfs
        assert sorted(got["vfs"], key=int) == [str(i) for i in range(numvfs)]
        dev = root / "sys/bus/pci/devices" / pci
        assert (dev / "sriov_numvfs").read_text().strip() == str(numvfs)
        assert (root / "sys/class/net" / pf["name"]).exists()
        vf_name = pf.get("vf_name", pf["name"] + "v{vf}")
        for i in range(numvfs):
            vf, s, where = got["vfs"][str(i)], vf_settings(pf, i), f"{pf['name']} VF {i}"
            assert vf["pci"] == vf_pcis[pci][i], where
            assert os.readlink(dev / f"virtfn{i}") == f"../{vf_pcis[pci][i]}", where
            driver = s.get("driver", "mlx5_core")
            driver = None if driver == "none" else driver
            bound = driver == "mlx5_core"  # the VF has a netdev in the host
            assert vf["driver"] == driver, where
            netdev = vf_name.format(vf=i, pf=pf["name"]) if bound else None
            assert vf["netdev"] == netdev, where
            if netdev:
                assert (root / "sys/class/net" / netdev).exists(), where
            for key, default in VF_DEFAULTS.items():
                assert vf[key] == s.get(key, default), f"{where}: {key}"
            assert vf["mtu"] == (s.get("mtu", 2044 if ib else 1500) if bound else None), where
            assert vf["up"] == (s.get("up", True) if bound else None), where
            if ib:
                assert "mac" not in vf and "netdev_mac" not in vf, where
                for g in ("node_guid", "port_guid"):
                    if g in s:
                        assert vf[g] == s[g].lower(), f"{where}: {g}"
                    else:
                        assert GUID_RE.match(vf[g]) and vf[g] != ZERO_GUID, f"{where}: {g}"
                        derived_guids.append(vf[g])
                    # the netdev took the admin GUIDs when it bound (all-zero ones too)
                    assert vf[f"netdev_{g}"] == (vf[g] if bound else None), f"{where}: {g}"
            else:
                assert "node_guid" not in vf and "port_guid" not in vf, where
                if "mac" in s:
                    assert vf["mac"] == s["mac"].lower(), where
                    explicit_macs.add(vf["mac"])
                else:
                    assert is_laa_unicast(vf["mac"]), f"{where}: derived MAC {vf['mac']}"
                    derived_macs.append(vf["mac"])
                assert vf["netdev_mac"] == (vf["mac"] if bound else None), where
    assert len(set(derived_macs)) == len(derived_macs), "derived VF MACs repeat on one node"
    assert not set(derived_macs) & explicit_macs, "a derived MAC equals an explicit one"
    assert len(set(derived_guids)) == len(derived_guids), "derived VF GUIDs repeat on one node"


# ---- tests -------------------------------------------------------------------------------------


def test_shared_scenarios_are_there():
    """The shared scenarios are required: without them this file would test almost nothing."""
    assert SHARED_SCENARIOS.is_dir(), f"shared scenarios missing: {SHARED_SCENARIOS} (required)"
    assert shared_scenarios(), f"no *.toml in {SHARED_SCENARIOS} (required)"


def test_examples_ship_with_the_package():
    assert {p.name for p in EXAMPLES.glob("*.toml")} >= EXPECTED_EXAMPLES
    for path in EXAMPLES.glob("*.toml"):
        text = path.read_text()
        assert text.startswith("#"), f"{path.name}: say what it demonstrates in a leading comment"
        assert "[driver]" in text and "[[pf]]" in text


@pytest.mark.parametrize("path", all_scenarios(), ids=scenario_id)
def test_ground_truth_is_what_the_scenario_says(path: Path, node):
    sc = tomllib.loads(path.read_text())
    root, gt = node(path)
    check_modules(sc, gt, root)
    check_node_files(gt, root)
    check_pfs(sc, gt, root)


def test_the_copy_of_the_shared_scenarios_is_identical_to_them():
    """tests/scenarios/shared stands in for ../shared/scenarios on a clone without ../shared."""
    if not SHARED_BESIDE.is_dir():
        pytest.skip(f"{SHARED_BESIDE} is not beside this clone: nothing to compare the copy with")
    beside = {p.name: p.read_bytes() for p in SHARED_BESIDE.glob("*.toml")}
    copy = {p.name: p.read_bytes() for p in SHARED_COPY.glob("*.toml")}
    assert copy == beside, "refresh it: cp ../shared/scenarios/*.toml tests/scenarios/shared/"


def test_acceptance_upgrade_50vf_eth(node):
    """`sim init ../shared/scenarios/upgrade-50vf-eth.toml --root DIR && sim state --root DIR`."""
    if not SHARED_BESIDE.is_dir():
        pytest.skip(f"the README's relative path needs {SHARED_BESIDE} beside this clone")
    rel = "../shared/scenarios/upgrade-50vf-eth.toml"
    assert (PROJECT / rel).samefile(SHARED_SCENARIOS / "upgrade-50vf-eth.toml")
    _root, gt = node(rel)  # the CLI runs with cwd = the project root
    loaded = tomllib.loads((PROJECT / rel).read_text())["driver"]["loaded"]
    for m in ("mlx5_core", "mlx5_ib", "ib_core"):
        assert gt["modules"][m]["srcversion"] == loaded[m]
    (pf,) = gt["pfs"].values()
    vfs = pf["vfs"]
    assert pf["numvfs"] == 50 and len(vfs) == 50
    assert vfs["1"]["vlan"] == 100
    assert (vfs["2"]["trust"], vfs["2"]["spoofchk"]) == (False, True)
    for i, vf in vfs.items():
        if i != "2":
            assert (vf["trust"], vf["spoofchk"]) == (True, False), i
        assert vf["mtu"] == 9000, i
        assert vf["netdev"] == f"enp1s0f0v{i}", i
        assert vf["driver"] == "mlx5_core", i


def test_derived_values_are_deterministic(node):
    """Same scenario, same node: derived MACs, GUIDs and srcversions do not change between inits."""
    for name in ("upgrade-50vf-eth.toml", "dgx-ib-8x8.toml"):
        _a, first = node(EXAMPLES / name)
        _b, second = node(EXAMPLES / name)
        assert first["pfs"] == second["pfs"]
        assert first["modules"] == second["modules"]


# The demo, and two quick ones: nothing to reload (ready at once), a refused reload (exit 1).
RUN_EXAMPLES = ("upgrade-50vf-eth.toml", "restart-no-reload.toml", "storage-holder.toml")


@pytest.mark.parametrize("path", [EXAMPLES / n for n in RUN_EXAMPLES], ids=lambda p: p.stem)
def test_sim_run_report(path: Path, tmp_path: Path):
    """`sim run FILE --report R` prints a timeline and writes the contract's report."""
    sc = tomllib.loads(path.read_text())
    report_path = tmp_path / "report.json"
    nodes = tmp_path / "tmp"
    nodes.mkdir()
    try:  # sim run makes its node under TMPDIR: keep it in tmp_path, and stop it whatever happens
        r = cli("sim", "run", str(path), "--report", str(report_path),
                env={"TMPDIR": str(nodes)}, timeout=120)
    finally:
        for root in nodes.glob("*"):
            stop_kernel(root)
    assert report_path.exists(), f"no report\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    report = json.loads(report_path.read_text())
    assert set(report) >= REPORT_KEYS, REPORT_KEYS - set(report)
    assert report["outcome"] in ("ready", "failed", "timeout")
    assert r.returncode == (0 if report["outcome"] == "ready" else 1), r.stderr
    assert report["scenario"] == sc["node"].get("name", path.stem)
    assert report["time_scale"] == sc["node"].get("time_scale", 1.0)
    assert isinstance(report["reloaded"], bool) and isinstance(report["phases"], list)
    pfs = sc.get("pf", [])
    assert report["vfs"]["total"] == sum(pf.get("numvfs", 0) for pf in pfs)
    for state in ("state_before", "state_after"):
        assert set(report[state]["pfs"]) == {pf["pci"].lower() for pf in pfs}, state
        assert "modules" in report[state] and "blacklist_files" in report[state], state
    before = report["state_before"]["modules"]
    for m, src in sc["driver"].get("loaded", {}).items():
        assert before[canon(m)]["srcversion"] == src

    # The timeline: human lines naming the scenario and its PFs.
    assert sc["node"].get("name", path.stem) in r.stdout
    for pf in pfs:
        assert pf["name"] in r.stdout

    # restore_limit_s: the VFs' probes (netdev delays) scheduled on probe_parallel lanes, the last
    # rename included, scaled (contract version 2): at least the slowest VF and the sum of the
    # probes over the lanes, at most that sum plus the slowest. Delays are seeded draws from
    # ranges, so check the bounds the scenario gives.
    udev, ts = sc.get("udev", {}), sc["node"].get("time_scale", 1.0)
    late = {int(k): float(v) for k, v in udev.get("late_vfs", {}).items()}
    nd_lo, nd_hi = delay_bounds(udev.get("netdev_delay_s", 0.5), 0.5)
    rn_lo, rn_hi = delay_bounds(udev.get("rename_delay_s", 0.1), 0.1)
    if not udev.get("rename", True):
        rn_lo = rn_hi = 0.0
    netdev_vfs = [i for pf in pfs for i in range(pf.get("numvfs", 0))
                  if vf_settings(pf, i).get("driver", "mlx5_core") == "mlx5_core"]
    if not netdev_vfs:
        assert report["restore_limit_s"] == 0
        return
    lanes = udev.get("probe_parallel", 1)
    probes_lo = [late.get(i, nd_lo) for i in netdev_vfs]
    probes_hi = [late.get(i, nd_hi) for i in netdev_vfs]
    lo = max(max(probes_lo), sum(probes_lo) / lanes) + rn_lo
    hi = sum(probes_hi) / lanes + max(probes_hi) + rn_hi
    limit = report["restore_limit_s"]
    assert limit > 0
    assert lo * ts - 1e-6 <= limit <= hi * ts + 1e-6, (lo * ts, limit, hi * ts)
    if path.name == "upgrade-50vf-eth.toml":
        assert limit >= 0.12  # VF 37's netdev alone takes 12.0 s x 0.01
