"""Every IFLA_VF_* setting through the project's netlink seam (host.netlink.PyrouteNetlink) on a
real rtnetlink: netdevsim's PF takes VF settings as mlx5's does."""

from __future__ import annotations

import errno

import pytest

from mofed_lifecycle.host.netlink import PyrouteNetlink
from mofed_lifecycle.host.netlink_types import NetlinkError, VfChange

from .conftest import Nsim


@pytest.fixture
def nl():
    n = PyrouteNetlink()
    yield n
    n.close()


def test_each_vf_setting_is_set_and_read_back(nsim: Nsim, nl: PyrouteNetlink) -> None:
    nsim.numvfs(2)
    nl.set_vf(nsim.pf, 1, VfChange(mac="02:00:00:00:aa:01", vlan=42, qos=3, trust=True,
                                   spoofchk=False, link_state="enable", min_tx_rate=0,
                                   max_tx_rate=1000))
    vf = {v.index: v for v in nl.vfs(nsim.pf)}[1]
    assert (vf.mac, vf.vlan, vf.qos, vf.trust, vf.spoofchk, vf.link_state, vf.max_tx_rate) == (
        "02:00:00:00:aa:01", 42, 3, True, False, "enable", 1000)


def test_a_refused_value_is_an_errno(nsim: Nsim, nl: PyrouteNetlink) -> None:
    nsim.numvfs(1)
    with pytest.raises(NetlinkError) as e:
        nl.set_vf(nsim.pf, 0, VfChange(vlan=4096))
    assert e.value.errno in (errno.EINVAL, errno.ERANGE)
