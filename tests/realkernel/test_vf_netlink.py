"""Every IFLA_VF_* setting through the project's netlink seam (host.netlink.PyrouteNetlink) on a
real rtnetlink: netdevsim's PF takes VF settings as mlx5's does; the lane's GUID variant takes
IB node and port GUIDs as an IB PF does."""

from __future__ import annotations

import errno

import pytest
from pyroute2 import IPRoute

from mofed_lifecycle.host.netlink import PyrouteNetlink, vf_request
from mofed_lifecycle.host.netlink_types import ARPHRD_INFINIBAND, NetlinkError, VfChange

from .conftest import Nsim


@pytest.fixture
def nl():
    n = PyrouteNetlink()
    yield n
    n.close()


def vfs(nl: PyrouteNetlink, pf: str) -> dict:
    return {v.index: v for v in nl.vfs(pf)}


def test_each_vf_setting_is_set_and_read_back(nsim: Nsim, nl: PyrouteNetlink) -> None:
    nsim.numvfs(2)
    nl.set_vf(nsim.pf, 1, VfChange(mac="02:00:00:00:aa:01", vlan=42, qos=3, trust=True,
                                   spoofchk=False, link_state="enable", min_tx_rate=100,
                                   max_tx_rate=1000))
    vf = vfs(nl, nsim.pf)[1]
    assert (vf.mac, vf.vlan, vf.qos, vf.trust, vf.spoofchk, vf.link_state, vf.min_tx_rate,
            vf.max_tx_rate) == ("02:00:00:00:aa:01", 42, 3, True, False, "enable", 100, 1000)
    nl.set_vf(nsim.pf, 1, VfChange(link_state="disable", vlan=0, qos=0))
    vf = vfs(nl, nsim.pf)[1]
    assert (vf.link_state, vf.vlan, vf.mac) == ("disable", 0, "02:00:00:00:aa:01")
    assert vfs(nl, nsim.pf)[0].mac == "00:00:00:00:00:00"  # the other VF untouched


@pytest.mark.parametrize(("change", "vf"), [
    (VfChange(vlan=4096), 0),
    (VfChange(qos=8, vlan=1), 0),
    (VfChange(mac="01:00:5e:00:00:01"), 0),  # multicast
    (VfChange(mac="02:00:00:00:00:09"), 7),  # no such VF
])
def test_a_refused_value_is_einval_and_changes_nothing(nsim: Nsim, nl: PyrouteNetlink,
                                                       change: VfChange, vf: int) -> None:
    nsim.numvfs(2)
    before = nl.vfs(nsim.pf)
    with pytest.raises(NetlinkError) as e:
        nl.set_vf(nsim.pf, vf, change)
    assert e.value.errno == errno.EINVAL
    assert nl.vfs(nsim.pf) == before


def test_several_vfs_in_one_request(nsim: Nsim, nl: PyrouteNetlink) -> None:
    nsim.numvfs(3)
    nl.set_vfs(nsim.pf, {0: VfChange(mac="02:00:00:00:bb:00", trust=True),
                         2: VfChange(mac="02:00:00:00:bb:02", vlan=7)})
    got = vfs(nl, nsim.pf)
    assert (got[0].mac, got[0].trust) == ("02:00:00:00:bb:00", True)
    assert (got[2].mac, got[2].vlan) == ("02:00:00:00:bb:02", 7)
    assert got[1].mac == "00:00:00:00:00:00"


def test_partial_apply_keeps_the_fields_and_vfs_before_the_refused_one(nsim: Nsim,
                                                                        nl: PyrouteNetlink) -> None:
    """The contract's "Partial apply": fields in kernel order (MAC, VLAN, rates, spoofchk, link
    state, trust); the first refused stops the rest; earlier VF-infos stay applied."""
    nsim.numvfs(2)
    with pytest.raises(NetlinkError):
        nl.set_vf(nsim.pf, 0, VfChange(mac="02:00:00:00:cc:00", vlan=5000, trust=True))
    got = vfs(nl, nsim.pf)[0]
    assert (got.mac, got.vlan, got.trust) == ("02:00:00:00:cc:00", 0, False)
    with pytest.raises(NetlinkError):
        nl.set_vfs(nsim.pf, {0: VfChange(trust=True), 1: VfChange(mac="02:00:00:00:cc:01",
                                                                 vlan=5000)})
    got = vfs(nl, nsim.pf)
    assert got[0].trust is True  # the VF-info before the refused one stays applied
    assert (got[1].mac, got[1].vlan) == ("02:00:00:00:cc:01", 0)  # its MAC came before the VLAN


# ---- IB GUIDs (the lane's netdevsim variant: ndo_set_vf_guid / ndo_get_vf_guid) -------------

NODE, PORT = "00:11:22:33:44:55:66:77", "88:99:aa:bb:cc:dd:ee:01"


def test_node_and_port_guid_both_stick_through_set_vf(nsim_ib: Nsim, nl: PyrouteNetlink) -> None:
    """The bug the first real-kernel run found: one VF-info carrying both GUIDs sets only the
    node GUID (do_setvfinfo returns after it) and succeeds; set_vf sends them separately."""
    link = nl.link(nsim_ib.pf)
    assert link is not None and link.link_type == ARPHRD_INFINIBAND
    nsim_ib.numvfs(2)
    nl.set_vf(nsim_ib.pf, 1, VfChange(node_guid=NODE, port_guid=PORT))
    got = vfs(nl, nsim_ib.pf)[1]
    assert (got.node_guid, got.port_guid) == (NODE, PORT)
    nl.set_vfs(nsim_ib.pf, {0: VfChange(node_guid=PORT, port_guid=NODE)})
    got = vfs(nl, nsim_ib.pf)[0]
    assert (got.node_guid, got.port_guid) == (PORT, NODE)


def test_the_kernel_drops_a_port_guid_sent_beside_a_node_guid(nsim_ib: Nsim,
                                                             nl: PyrouteNetlink) -> None:
    """What the code before the fix sent (one IFLA_VF_INFO with both): the request succeeds and
    the port GUID is lost. This is the kernel behaviour the simulator's rule copies."""
    nsim_ib.numvfs(1)
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=nsim_ib.pf)[0]
        ipr.link("set", index=index, vf=vf_request(0, VfChange(node_guid=NODE, port_guid=PORT)))
    got = vfs(nl, nsim_ib.pf)[0]
    assert got.node_guid == NODE
    assert got.port_guid == "00:00:00:00:00:00:00:00"
