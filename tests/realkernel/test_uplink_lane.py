"""UPLINK_POLICY's re-apply path on the real kernel: a netdevsim PF carrying the default route
(directly, and as a bond's slave) is destroyed and made again, as a driver reload does; what the
kernel drops and what `reapply_uplink` puts back."""

from __future__ import annotations

import json
from typing import Any

from mofed_lifecycle.host.netlink import PyrouteNetlink
from mofed_lifecycle.lifecycle.uplink import reapply_uplink

from ..test_uplink import _Journal, _Node, _Runner
from .conftest import Nsim, load_netdevsim, settle, sh


def _saved(nl: PyrouteNetlink, name: str) -> dict[str, Any]:
    link = nl.link(name)
    assert link is not None
    # "pci": None: found again by name (netdevsim is no PCI device: no sysfs PCI address to
    # find its new netdev by, as the daemon does for a ConnectX PF)
    return {"pci": None, "addresses": nl.addresses(name),
            "routes": [r.to_json() for r in nl.routes(name)],
            "mtu": link.mtu, "up": link.up, "master": nl.master(name)}


def _reload(dev_id: int, old: Nsim) -> Nsim:
    """What a driver reload does to a PF: its netdev destroyed, a new one probed."""
    old.delete()
    again = Nsim(dev_id)
    assert again.pf == old.pf  # udev names it again the same
    return again


def test_a_reload_drops_the_pfs_addresses_and_routes_and_they_are_put_back():
    load_netdevsim()
    nsim = Nsim(41)
    nl = PyrouteNetlink()
    try:
        pf = nsim.pf
        sh("ip", "link", "set", pf, "mtu", "4000", "up")
        sh("ip", "addr", "add", "10.41.0.7/24", "dev", pf)
        sh("ip", "route", "add", "default", "via", "10.41.0.1", "dev", pf)
        saved = {"route_dev": pf, "pf_netdev": pf, "pf_pci": "nsim", "restored": False,
                 "devs": {pf: _saved(nl, pf)}}
        nsim = _reload(41, nsim)
        # the kernel's side of the simulator's rule: the new netdev has none of it
        assert nl.addresses(pf) == [] and nl.routes(pf) == []
        assert json.loads(sh("ip", "-j", "route", "show", "default").stdout) == []
        r = _Runner(_Node(nl), _Journal({"uplink": saved}))
        reapply_uplink(r, "nsim")  # type: ignore[arg-type]
        assert r.journal.facts["uplink"]["restored"] is True
        assert nl.addresses(pf) == ["10.41.0.7/24"]
        route = json.loads(sh("ip", "-j", "route", "show", "default").stdout)[0]
        assert (route["gateway"], route["dev"]) == ("10.41.0.1", pf)
        link = nl.link(pf)
        assert link is not None and (link.mtu, link.up) == (4000, True)
    finally:
        sh("ip", "route", "del", "default", check=False)
        nl.close()
        nsim.delete()


def test_a_bond_over_the_pf_gets_its_slave_back():
    load_netdevsim()
    sh("modprobe", "bonding", "max_bonds=0")
    nsim = Nsim(42)
    nl = PyrouteNetlink()
    try:
        pf = nsim.pf
        sh("ip", "link", "add", "bond42", "type", "bond", "mode", "active-backup")
        sh("ip", "link", "set", pf, "down")
        sh("ip", "link", "set", pf, "master", "bond42")
        sh("ip", "link", "set", "bond42", "up")
        sh("ip", "addr", "add", "10.42.0.7/24", "dev", "bond42")
        saved = {"route_dev": "bond42", "pf_netdev": pf, "pf_pci": "nsim", "restored": False,
                 "devs": {pf: _saved(nl, pf), "bond42": _saved(nl, "bond42")}}
        assert saved["devs"][pf]["master"] == "bond42"
        nsim = _reload(42, nsim)
        assert nl.master(pf) is None  # the new PF netdev is no slave of anything
        assert nl.addresses("bond42") == ["10.42.0.7/24"]  # the bond itself kept its address
        r = _Runner(_Node(nl), _Journal({"uplink": saved}))
        reapply_uplink(r, "nsim")  # type: ignore[arg-type]
        assert nl.master(pf) == "bond42" and r.journal.facts["uplink"]["restored"] is True
        slaves = (sh("cat", "/sys/class/net/bond42/bonding/slaves").stdout.split())
        assert slaves == [pf]
    finally:
        sh("ip", "link", "del", "bond42", check=False)
        nl.close()
        nsim.delete()
        settle()


def test_the_uplink_path_as_the_kernel_lays_it_out_and_a_vlan_dies_with_its_pf():
    """uplink_path reads sysfs `lower_*` and `bonding/` as Linux makes them: a VLAN on a bond on
    the PF survives the PF's reload (the daemon re-enslaves the PF), a VLAN on the PF itself is
    destroyed with it (so UPLINK_POLICY=restore refuses that reload)."""
    from mofed_lifecycle.doctor.rdma_config import Device
    from mofed_lifecycle.doctor.uplink_path import uplink_path
    from mofed_lifecycle.host.commands import Commands
    from mofed_lifecycle.host.node import Tools
    from mofed_lifecycle.host.paths import NodePaths

    load_netdevsim()
    sh("modprobe", "bonding", "max_bonds=0")
    sh("modprobe", "8021q")
    nsim = Nsim(43)
    tools = Tools(NodePaths.at("/"), Commands({}))
    try:
        pf = nsim.pf
        devices = [Device("nsim43", "15b3", "101d", "mlx5_core", (pf,), "ether")]
        sh("ip", "link", "add", "bond43", "type", "bond", "mode", "active-backup")
        sh("ip", "link", "set", pf, "down")
        sh("ip", "link", "set", pf, "master", "bond43")
        sh("ip", "link", "add", "link", "bond43", "name", "bond43.7", "type", "vlan", "id", "7")
        for dev in ("bond43", "bond43.7"):
            sh("ip", "link", "set", dev, "up")
        sh("ip", "addr", "add", "10.43.0.7/24", "dev", "bond43.7")
        sh("ip", "route", "add", "default", "via", "10.43.0.1", "dev", "bond43.7")
        up = uplink_path(tools, devices, {"nsim43"})
        assert up is not None and up.route_dev == "bond43.7"
        assert up.pfs == {pf: "nsim43"} and up.dies_with_pf == ()
        sh("ip", "route", "del", "default")
        sh("ip", "link", "del", "bond43")  # (its VLAN goes with it)
        sh("ip", "link", "add", "link", pf, "name", "pf43.9", "type", "vlan", "id", "9")
        sh("ip", "link", "set", pf, "up")
        sh("ip", "link", "set", "pf43.9", "up")
        sh("ip", "addr", "add", "10.44.0.7/24", "dev", "pf43.9")
        sh("ip", "route", "add", "default", "via", "10.44.0.1", "dev", "pf43.9")
        up = uplink_path(tools, devices, {"nsim43"})
        assert up is not None and up.pfs == {pf: "nsim43"} and up.dies_with_pf == ("pf43.9",)
        nsim = _reload(43, nsim)
        links = json.loads(sh("ip", "-j", "link", "show").stdout)
        assert "pf43.9" not in {x["ifname"] for x in links}  # destroyed with its PF
    finally:
        sh("ip", "route", "del", "default", check=False)
        sh("ip", "link", "del", "bond43", check=False)
        nsim.delete()
        settle()
