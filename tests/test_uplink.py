"""UPLINK_POLICY: the node's uplink on a PF the reload takes down (issue 15), on simulated nodes
(ground truth: addresses, default route, the order against the VFs) and its re-apply path on
real netdevs in a network namespace."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

from mofed_lifecycle.host.netlink import PyrouteNetlink
from mofed_lifecycle.host.netlink_types import LinkChange, Route
from mofed_lifecycle.lifecycle.uplink import reapply_uplink
from mofed_lifecycle.log import get_logger

from .conftest import SCENARIOS
from .test_lifecycle import events, jsonl, lifecycle
from .test_netlink_real import ip, netns  # noqa: F401 - the fixture

UPLINK = SCENARIOS / "uplink-upgrade.toml"
PF = "0000:08:00.0"
ADDRS = ["10.0.0.7/24", "fd00::7/64"]


def truth(k) -> tuple[str | None, list[str]]:
    st = k.call("state")
    return st["default_route"], st["pfs"][PF]["addresses"]


def test_restore_puts_the_addresses_and_default_route_back_before_the_first_vf(make_node):
    root, k = make_node(UPLINK)
    assert truth(k) == ("enp8s0f0np0", ADDRS)
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    assert truth(k) == ("enp8s0f0np0", ADDRS)
    assert k.call("state")["pfs"][PF]["mtu"] == 9000
    tl = jsonl(root / ".sim/timeline.jsonl")
    lost = next(i for i, e in enumerate(tl) if e["event"] == "route.lost")
    back = next(i for i, e in enumerate(tl) if e["event"] == "route.default" and i > lost)
    first_vf = next(i for i, e in enumerate(tl) if e["event"] == "pci.bound" and i > lost)
    added = [i for i, e in enumerate(tl) if e["event"] == "addr.added"]
    assert len(added) == 2 and max(added) < first_vf and back < first_vf
    evs = [e["event"] for e in events(r.stderr)]
    assert evs.index("uplink.saved") < evs.index("openibd.restart") < evs.index(
        "uplink.restored")


def test_refuse_refuses_the_reload_and_touches_nothing(make_node):
    root, k = make_node(UPLINK)
    before = k.call("state")["modules"]
    r = lifecycle(root, "--once", env={"UPLINK_POLICY": "refuse"})
    assert r.returncode == 1
    refused = next(e for e in events(r.stderr) if e["event"] == "reload.refused")
    assert "uplink enp8s0f0np0 is on PF 0000:08:00.0" in refused["reason"]
    assert "UPLINK_POLICY=refuse" in refused["reason"]
    assert k.call("state")["modules"] == before and truth(k) == ("enp8s0f0np0", ADDRS)


def test_ignore_only_warns_and_the_uplink_is_lost_as_on_todays_nodes(make_node):
    root, k = make_node(UPLINK)
    r = lifecycle(root, "--once", env={"UPLINK_POLICY": "ignore"})
    assert r.returncode == 0
    assert "uplink.not_protected" in [e["event"] for e in events(r.stderr)]
    assert truth(k) == (None, [])


def test_killed_before_the_restore_the_next_start_puts_the_uplink_back(make_node):
    root, k = make_node(UPLINK)
    r = lifecycle(root, "--once", env={"MOFED_LIFECYCLE_CRASH_AT": "restore"})
    assert r.returncode == -9 and truth(k) == (None, [])  # the PF came back bare
    r = lifecycle(root, "--once")
    assert r.returncode == 0, r.stderr[-2000:]
    assert truth(k) == ("enp8s0f0np0", ADDRS)
    assert "uplink.restored" in [e["event"] for e in events(r.stderr)]


def test_a_bad_policy_is_refused_at_start(tiny):
    root, _k = tiny
    r = lifecycle(root, "--once", env={"UPLINK_POLICY": "sometimes"})
    assert r.returncode == 2 and "UPLINK_POLICY='sometimes': expected restore" in r.stderr


# ---- the re-apply path on a real kernel ----------------------------------------------------------


@dataclass
class _Journal:
    facts: dict[str, Any] = field(default_factory=dict)

    def set(self, **kw: Any) -> None:
        self.facts.update(kw)


@dataclass
class _Node:
    netlink: Any


@dataclass
class _Runner:
    """What reapply_uplink uses of the runner: the journal, the node's netlink, the log."""

    node: _Node
    journal: _Journal
    log: Any = field(default_factory=lambda: get_logger("test"))


def test_the_saved_uplink_is_re_applied_on_real_netdevs(netns: str) -> None:  # noqa: F811
    nl = PyrouteNetlink(netns=netns)
    try:
        ip("-n", netns, "link", "set", "nla0", "mtu", "9000", "up")
        ip("-n", netns, "link", "set", "nlb0", "up")
        ip("-n", netns, "addr", "add", "10.9.0.7/24", "dev", "nla0")
        ip("-n", netns, "route", "add", "default", "via", "10.9.0.1", "dev", "nla0")
        saved = {"addresses": nl.addresses("nla0"),
                 "routes": [x.to_json() for x in nl.routes("nla0")],
                 "mtu": 9000, "up": True, "master": nl.master("nla0")}
        assert saved["addresses"] == ["10.9.0.7/24"] and saved["master"] is None
        assert saved["routes"] == [{"dst": "default", "gateway": "10.9.0.1", "priority": None}]
        # what a reload does to the PF: its addresses and routes gone, the link reset
        ip("-n", netns, "addr", "flush", "dev", "nla0")
        nl.set_link("nla0", LinkChange(up=False, mtu=1500))
        assert nl.addresses("nla0") == [] and nl.routes("nla0") == []
        r = _Runner(_Node(nl), _Journal({"uplink": {
            "route_dev": "nla0", "pf_netdev": "nla0", "pf_pci": "0000:08:00.0",
            "devs": {"nla0": saved}, "restored": False}}))
        reapply_uplink(r, "0000:08:00.0")  # type: ignore[arg-type]
        assert r.journal.facts["uplink"]["restored"] is True
        shown = json.loads(ip("-n", netns, "-j", "route", "show", "default").stdout)
        assert shown[0]["gateway"] == "10.9.0.1" and shown[0]["dev"] == "nla0"
        link = nl.link("nla0")
        assert link is not None and (link.mtu, link.up) == (9000, True)
        assert nl.addresses("nla0") == ["10.9.0.7/24"]
        reapply_uplink(r, "0000:08:00.0")  # type: ignore[arg-type]  # done once: no-op
        nl.add_address("nla0", "10.9.0.7/24")  # already there: no error
        nl.add_route("nla0", Route("default", "10.9.0.1"))
    finally:
        nl.close()


def test_bond_membership_comes_back_on_real_netdevs(netns: str) -> None:  # noqa: F811
    try:
        ip("-n", netns, "link", "add", "bond0", "type", "bond")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no bonding in this kernel: {e.stderr.strip()}")
    nl = PyrouteNetlink(netns=netns)
    try:
        ip("-n", netns, "link", "set", "nla0", "master", "bond0")
        assert nl.master("nla0") == "bond0"
        ip("-n", netns, "link", "set", "nla0", "nomaster")
        r = _Runner(_Node(nl), _Journal({"uplink": {
            "route_dev": "bond0", "pf_netdev": "nla0", "pf_pci": "p",
            "devs": {"nla0": {"addresses": [], "routes": [], "mtu": None, "up": True,
                              "master": "bond0"}}, "restored": False}}))
        reapply_uplink(r, "p")  # type: ignore[arg-type]
        assert nl.master("nla0") == "bond0"
    finally:
        nl.close()
