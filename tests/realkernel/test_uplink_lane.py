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
    return {"addresses": nl.addresses(name), "routes": [r.to_json() for r in nl.routes(name)],
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
