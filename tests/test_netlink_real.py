"""host.netlink.PyrouteNetlink: pure conversions, and the real kernel inside a network namespace."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.requests.link import LinkIPRouteFilter

from mofed_lifecycle.host.netlink import (
    PyrouteNetlink,
    guid_from_pyroute2,
    guid_from_raw,
    guid_to_int,
    guid_to_pyroute2,
    int_to_guid,
    link_info,
    link_state_code,
    link_state_name,
    vf_request,
    vfs_of,
)
from mofed_lifecycle.host.netlink_types import (
    ARPHRD_ETHER,
    ARPHRD_INFINIBAND,
    LinkChange,
    NetlinkError,
    VfChange,
    VfSettings,
)

# rtnetlink attribute numbers (linux/if_link.h), to build messages shaped as the kernel sends them
IFLA_IFNAME, IFLA_MTU, IFLA_NUM_VF, IFLA_VFINFO_LIST, IFLA_VF_INFO = 3, 4, 21, 22, 1
VF_MAC, VF_VLAN, VF_SPOOFCHK, VF_LINK_STATE, VF_RATE, VF_TRUST = 1, 2, 4, 5, 6, 9
VF_IB_NODE_GUID, VF_IB_PORT_GUID = 10, 11
guids = st.integers(min_value=0, max_value=2**64 - 1)


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nlas(data: bytes) -> dict[int, bytes]:
    """{type: payload} of the attributes packed in `data`."""
    found, off = {}, 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        found[kind & 0x3FFF] = data[off + 4 : off + length]
        off += (length + 3) & ~3
    return found


def kernel_newlink(vfinfo: bytes) -> ifinfmsg:
    """An RTM_NEWLINK for IPoIB PF `ib0` with one VF, decoded by pyroute2 as off the socket."""
    attrs = nla(IFLA_IFNAME, b"ib0\0") + nla(IFLA_MTU, struct.pack("=I", 4092))
    attrs += nla(IFLA_NUM_VF, struct.pack("=I", 1))
    attrs += nla(IFLA_VFINFO_LIST, nla(IFLA_VF_INFO, vfinfo))
    body = struct.pack("=BxHiII", 0, ARPHRD_INFINIBAND, 7, 1, 0) + attrs
    msg = ifinfmsg(struct.pack("=IHHII", 16 + len(body), 16, 2, 1, 0) + body)
    msg.decode()
    return msg


def vf_guid(kind: int, vf: int, guid: int) -> bytes:
    return nla(kind, struct.pack("=IxxxxQ", vf, guid))  # struct ifla_vf_guid, host byte order


# --- pure: VfChange -> pyroute2 request --------------------------------------------------------


def test_vf_request_carries_only_the_set_fields() -> None:
    assert vf_request(3, VfChange()) == {"vf": 3}
    assert vf_request(3, VfChange(mac="AA:BB:CC:00:00:01")) == {"vf": 3, "mac": "aa:bb:cc:00:00:01"}
    assert vf_request(0, VfChange(spoofchk=False, trust=True, link_state="disable")) == {
        "vf": 0,
        "spoofchk": 0,
        "trust": 1,
        "link_state": 2,
    }
    full = VfChange(
        vlan=100,
        qos=3,
        min_tx_rate=10,
        max_tx_rate=1000,
        node_guid="00:11:22:33:44:55:66:77",
        port_guid="00:11:22:33:44:55:66:78",
    )
    req = vf_request(5, full)
    assert set(req) == {"vf", "vlan", "rate", "ib_node_guid", "ib_port_guid"}
    assert req["vlan"] == {"vlan": 100, "qos": 3}
    assert req["rate"] == {"min_tx_rate": 10, "max_tx_rate": 1000}


def test_vf_request_keeps_the_untouched_half_of_a_pair() -> None:
    current = VfSettings(index=2, vlan=7, qos=4, min_tx_rate=5, max_tx_rate=500)
    req = vf_request(2, VfChange(qos=1, max_tx_rate=900), current)
    assert req == {
        "vf": 2,
        "vlan": {"vlan": 7, "qos": 1},
        "rate": {"min_tx_rate": 5, "max_tx_rate": 900},
    }
    assert vf_request(2, VfChange(vlan=9))["vlan"] == {"vlan": 9, "qos": 0}  # nothing known: 0


def test_vf_request_survives_pyroute2_popping_keys() -> None:
    req = vf_request(1, VfChange(mac="02:00:00:00:00:01", vlan=3))
    built = LinkIPRouteFilter("set").set_vf({}, copy.deepcopy(req))
    names = [a[0] for a in built["IFLA_VFINFO_LIST"]["attrs"][0][1]["attrs"]]
    assert sorted(names) == ["IFLA_VF_MAC", "IFLA_VF_VLAN"]
    assert req == vf_request(1, VfChange(mac="02:00:00:00:00:01", vlan=3))


def test_link_state_mapping() -> None:
    assert [link_state_code(s) for s in ("auto", "enable", "disable")] == [0, 1, 2]
    assert [link_state_name(c) for c in (0, 1, 2, 3)] == ["auto", "enable", "disable", None]
    with pytest.raises(ValueError):
        link_state_code("on")  # type: ignore[arg-type]


# --- pure: GUIDs -------------------------------------------------------------------------------


def test_guid_string_is_most_significant_byte_first() -> None:
    assert guid_to_int("00:11:22:33:44:55:66:77") == 0x0011223344556677
    assert int_to_guid(0xF452140300A1B2C3) == "f4:52:14:03:00:a1:b2:c3"
    for bad in ("00:11:22", "0:11:22:33:44:55:66:77", "zz:11:22:33:44:55:66:77"):
        with pytest.raises(ValueError):
            guid_to_int(bad)


def test_guid_for_pyroute2_is_the_string_on_little_endian_and_reversed_on_big() -> None:
    assert guid_to_pyroute2("00:11:22:33:44:55:66:AA", "little") == "00:11:22:33:44:55:66:aa"
    assert guid_to_pyroute2("00:11:22:33:44:55:66:77", "big") == "77:66:55:44:33:22:11:00"


@given(guids, st.sampled_from(["little", "big"]))
def test_guid_round_trips(value: int, order: str) -> None:
    text = int_to_guid(value)
    assert guid_to_int(text) == value
    assert guid_from_pyroute2(guid_to_pyroute2(text, order), order) == text  # type: ignore[arg-type]
    raw = struct.pack("=IxxxxQ", 0, value)  # what this host's kernel would send
    assert guid_from_raw(raw, sys.byteorder) == text


def test_guid_encoded_by_pyroute2_reaches_the_kernel_as_a_host_order_u64() -> None:
    req = vf_request(
        3, VfChange(node_guid="00:11:22:33:44:55:66:77", port_guid="f4:52:14:03:00:a1:b2:c3")
    )
    msg = ifinfmsg()
    msg["index"] = 1
    msg["attrs"] = list(LinkIPRouteFilter("set").set_vf({}, copy.deepcopy(req)).items())
    msg.encode()
    data = bytes(msg.data[: msg["header"]["length"]])
    vfinfo = nlas(nlas(nlas(data[32:])[IFLA_VFINFO_LIST])[IFLA_VF_INFO])
    for kind, expected in (
        (VF_IB_NODE_GUID, 0x0011223344556677),
        (VF_IB_PORT_GUID, 0xF452140300A1B2C3),
    ):
        vf, guid = struct.unpack_from("=IxxxxQ", vfinfo[kind])  # struct ifla_vf_guid
        assert (vf, guid) == (3, expected)


def test_vf_info_from_a_kernel_shaped_message() -> None:
    vfinfo = b"".join(
        [
            nla(VF_MAC, struct.pack("=I", 4) + bytes.fromhex("02aabbcc0001") + b"\0" * 26),
            nla(VF_VLAN, struct.pack("=III", 4, 100, 5)),
            nla(VF_SPOOFCHK, struct.pack("=II", 4, 1)),
            nla(VF_LINK_STATE, struct.pack("=II", 4, 2)),
            nla(VF_RATE, struct.pack("=III", 4, 10, 1000)),
            nla(VF_TRUST, struct.pack("=II", 4, 0xFFFFFFFF)),  # driver does not report trust
            vf_guid(VF_IB_NODE_GUID, 4, 0x0011223344556677),
            vf_guid(VF_IB_PORT_GUID, 4, 0xF452140300A1B2C3),  # last: pyroute2 leaves it undecoded
        ]
    )
    msg = kernel_newlink(vfinfo)
    assert vfs_of(msg) == [
        VfSettings(
            index=4,
            mac="02:aa:bb:cc:00:01",
            vlan=100,
            qos=5,
            spoofchk=True,
            trust=None,
            link_state="disable",
            min_tx_rate=10,
            max_tx_rate=1000,
            node_guid="00:11:22:33:44:55:66:77",
            port_guid="f4:52:14:03:00:a1:b2:c3",
        )
    ]
    info = link_info(msg)
    assert (info.name, info.mtu, info.link_type, info.num_vf, info.up) == ("ib0", 4092, 32, 1, True)


def test_vf_info_without_optional_attributes() -> None:
    msg = kernel_newlink(nla(VF_MAC, struct.pack("=I", 0) + b"\0" * 32))
    assert vfs_of(msg) == [VfSettings(index=0, mac="00:00:00:00:00:00")]


# --- the real kernel, inside a throwaway network namespace --------------------------------------


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace holding veth pair nla0 <-> nlb0 (both down, MTU 1500)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"mofed-nl-{uuid.uuid4().hex[:10]}"
    try:
        ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot create a network namespace: {getattr(e, 'stderr', '') or e}")
    try:
        try:
            ip("-n", name, "link", "add", "nla0", "type", "veth", "peer", "name", "nlb0")
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot create a veth pair: {e.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


@pytest.fixture
def nl(netns: str) -> Iterator[PyrouteNetlink]:
    n = PyrouteNetlink(netns=netns)
    yield n
    n.close()


def ip_show(netns: str, name: str) -> dict:
    return json.loads(ip("-n", netns, "-j", "link", "show", "dev", name).stdout)[0]


def test_link_reports_what_the_kernel_holds(netns: str, nl: PyrouteNetlink) -> None:
    info = nl.link("nla0")
    seen = ip_show(netns, "nla0")
    assert info is not None
    assert (info.ifindex, info.name, info.mtu, info.address) == (
        seen["ifindex"],
        "nla0",
        1500,
        seen["address"],
    )
    assert (info.link_type, info.up, info.num_vf) == (ARPHRD_ETHER, False, 0)
    assert {"lo", "nla0", "nlb0"} <= {link.name for link in nl.links()}
    assert nl.link("nope") is None
    assert nl.link("x" * 40) is None


def test_set_link_changes_are_visible_afterwards(netns: str, nl: PyrouteNetlink) -> None:
    nl.set_link("nla0", LinkChange(mtu=9000, up=True, address="02:00:00:00:0a:01"))
    info = nl.link("nla0")
    assert info is not None
    assert (info.mtu, info.up, info.address) == (9000, True, "02:00:00:00:0a:01")
    assert "UP" in ip_show(netns, "nla0")["flags"]
    nl.set_link("nla0", LinkChange(up=False, extra={"txqlen": 321}))
    assert ip_show(netns, "nla0")["txqlen"] == 321
    assert nl.link("nla0").up is False  # type: ignore[union-attr]
    assert "UP" not in ip_show(netns, "nla0")["flags"]


def test_rename_goes_down_first_and_the_new_name_is_found(netns: str, nl: PyrouteNetlink) -> None:
    nl.set_link("nla0", LinkChange(up=True))
    index = nl.link("nla0").ifindex  # type: ignore[union-attr]
    nl.set_link("nla0", LinkChange(up=False, name="nlren0", mtu=4000))
    assert nl.link("nla0") is None
    renamed = nl.link("nlren0")
    assert renamed is not None
    assert (renamed.ifindex, renamed.mtu, renamed.up) == (index, 4000, False)


def test_refusals_are_our_error_naming_link_and_operation(nl: PyrouteNetlink) -> None:
    with pytest.raises(NetlinkError) as bad_mtu:
        nl.set_link("nla0", LinkChange(mtu=10))
    assert bad_mtu.value.errno == errno.EINVAL
    assert "nla0" in str(bad_mtu.value) and "mtu 10" in str(bad_mtu.value)
    assert nl.link("nla0").mtu == 1500  # type: ignore[union-attr]
    with pytest.raises(NetlinkError) as bad_mac:
        nl.set_link("nla0", LinkChange(address="not-a-mac"))
    assert bad_mac.value.errno == errno.EINVAL and "nla0" in str(bad_mac.value)
    for call in (
        lambda: nl.set_link("nope", LinkChange(mtu=1400)),
        lambda: nl.vfs("nope"),
        lambda: nl.set_vf("nope", 0, VfChange(trust=True)),
    ):
        with pytest.raises(NetlinkError) as missing:
            call()
        assert missing.value.errno == errno.ENODEV and "no netdev named nope" in str(missing.value)


def test_veth_has_no_vfs_and_refuses_vf_settings(nl: PyrouteNetlink) -> None:
    assert nl.vfs("nla0") == []
    changes = (
        VfChange(mac="02:00:00:00:00:01"),
        VfChange(vlan=5, qos=1),
        VfChange(trust=True),
        VfChange(node_guid="00:11:22:33:44:55:66:77"),
        VfChange(min_tx_rate=1),
    )
    for change in changes:
        with pytest.raises(NetlinkError) as refused:
            nl.set_vf("nla0", 0, change)
        assert refused.value.errno == errno.EOPNOTSUPP
        assert "VF 0" in str(refused.value) and "nla0" in str(refused.value)
    nl.set_vf("nla0", 0, VfChange())  # nothing to apply: no request


def test_missing_namespace_is_our_error() -> None:
    with pytest.raises(NetlinkError) as missing:
        PyrouteNetlink(netns=f"mofed-nl-absent-{uuid.uuid4().hex[:8]}")
    assert missing.value.errno == errno.ENOENT


def altname_rules(nl, holder: str, alt: str, other: str) -> None:
    """The contract's "Altnames" as the daemon sees them through the `Netlink` seam: `holder`
    carries altname `alt` (udev's policy after a rename), `other` is any other netdev (down)."""
    info = nl.link(alt)  # a name lookup resolves an altname too
    assert info is not None and info.name == holder and alt in info.altnames
    for who in (other, holder):  # any netdev, the holder itself too
        with pytest.raises(NetlinkError) as taken:
            nl.set_link(who, LinkChange(name=alt, up=False))
        assert taken.value.errno == errno.EEXIST
    nl.del_altname(holder, alt)
    assert nl.link(alt) is None and alt not in nl.link(holder).altnames
    nl.set_link(other, LinkChange(name=alt, up=False))
    assert nl.link(alt).name == alt
    with pytest.raises(NetlinkError) as missing:
        nl.del_altname(holder, "nosuchalt")
    assert missing.value.errno == errno.ENOENT


def test_altnames_on_the_real_kernel(netns: str, nl: PyrouteNetlink) -> None:
    ip("-n", netns, "link", "property", "add", "dev", "nla0", "altname", "pf0vf0")  # as udev does
    altname_rules(nl, "nla0", "pf0vf0", "nlb0")


def test_the_simulator_follows_the_same_altname_rules(tiny) -> None:
    from mofed_lifecycle.sim.client import KernelClient
    from mofed_lifecycle.sim.netlink import SimNetlink

    root, _k = tiny
    with KernelClient(root) as client:
        nl = SimNetlink(client)
        nl.set_link("enp8s0f0v0", LinkChange(name="vfx", up=False))  # away from udev's name
        nl.set_link("enp8s0f0v1", LinkChange(up=False))
        altname_rules(nl, "vfx", "enp8s0f0v0", "enp8s0f0v1")
