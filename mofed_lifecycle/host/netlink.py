"""The real node's side of the netlink seam: `Netlink` over rtnetlink, through pyroute2.

Links are resolved by name at the moment of use (RTM_GETLINK with RTEXT_FILTER_VF), then changed
by ifindex. Every kernel refusal or pyroute2 failure leaves as our `NetlinkError` naming the
operation and the link. The pure conversions (VfChange -> pyroute2 `vf=` request, VF-info
attributes -> VfSettings, GUID string <-> u64) are module-level functions.

GUIDs: the kernel's `struct ifla_vf_guid {__u32 vf; __u64 guid;}` holds the GUID as a u64 in host
byte order, the string's first byte most significant (iproute2's get_guid). pyroute2 0.9.7
(netlink/rtnl/ifinfmsg/__init__.py, vfinfo.vf_ib_node_guid / vf_ib_port_guid) encodes and decodes
the string by reversing its bytes into struct bytes 8..16: right on little-endian hosts only, and
its decoder reads 32 bytes, so a GUID attribute that ends the buffer comes back as raw bytes.
"""

from __future__ import annotations

import copy
import errno
import os
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from .netlink_l3 import L3Mixin
from .netlink_types import (
    LinkChange,
    LinkInfo,
    LinkState,
    NetlinkError,
    VfChange,
    VfSettings,
    vf_infos,
)

ByteOrder = Literal["little", "big"]
RTEXT_FILTER_VF = 1
IFF_UP = 0x1
IFNAMSIZ = 16
UNREPORTED = 0xFFFFFFFF  # spoofchk/trust a driver does not report: the kernel's (u32)-1
LINK_STATES: tuple[LinkState, ...] = ("auto", "enable", "disable")  # IFLA_VF_LINK_STATE_* 0, 1, 2


def guid_to_int(guid: str) -> int:
    """GUID string -> u64: "00:11:22:33:44:55:66:77" is 0x0011223344556677 (MSB first)."""
    parts = guid.split(":")
    if len(parts) != 8 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a GUID (8 colon-separated bytes): {guid!r}")
    return int.from_bytes(bytes.fromhex("".join(parts)), "big")


def int_to_guid(value: int) -> str:
    return ":".join(f"{b:02x}" for b in value.to_bytes(8, "big"))


def guid_to_pyroute2(guid: str, byteorder: ByteOrder = sys.byteorder) -> str:
    """The string to hand pyroute2's GUID encoder so that the kernel receives u64 `guid`.

    pyroute2 writes the string's bytes in reverse into the u64's memory; the memory must hold the
    value in host order. On a little-endian host this is `guid` itself (lower-cased)."""
    memory = guid_to_int(guid).to_bytes(8, byteorder)
    return ":".join(f"{b:02x}" for b in reversed(memory))


def guid_from_pyroute2(text: str, byteorder: ByteOrder = sys.byteorder) -> str:
    """Our GUID string from the one pyroute2's decoder produced (the u64's memory, reversed)."""
    memory = bytes(reversed(bytes.fromhex(text.replace(":", ""))))
    return int_to_guid(int.from_bytes(memory, byteorder))


def guid_from_raw(raw: bytes, byteorder: ByteOrder = sys.byteorder) -> str | None:
    """Our GUID string from an undecoded `struct ifla_vf_guid` (payload, or NLA with header)."""
    if len(raw) < 16:
        return None
    return int_to_guid(int.from_bytes(raw[-8:], byteorder))


def link_state_code(state: LinkState) -> int:
    if state not in LINK_STATES:
        raise ValueError(f"link_state must be one of {LINK_STATES}, not {state!r}")
    return LINK_STATES.index(state)


def link_state_name(code: int) -> LinkState | None:
    return LINK_STATES[code] if 0 <= code < len(LINK_STATES) else None


def _keep(new: int | None, old: int) -> int:
    return old if new is None else new


def vf_request(vf: int, change: VfChange, current: VfSettings | None = None) -> dict[str, Any]:
    """pyroute2's `vf=` argument for `change`: the VF index and only the fields that are set.

    VLAN+QoS (IFLA_VF_VLAN) and min+max rate (IFLA_VF_RATE) travel as pairs; the half `change`
    leaves None is taken from `current` (0 if unknown), so it is not touched."""
    cur = current or VfSettings(index=vf)
    req: dict[str, Any] = {"vf": vf}
    if change.mac is not None:
        req["mac"] = change.mac.lower()
    if change.vlan is not None or change.qos is not None:
        req["vlan"] = {"vlan": _keep(change.vlan, cur.vlan), "qos": _keep(change.qos, cur.qos)}
    if change.spoofchk is not None:
        req["spoofchk"] = int(change.spoofchk)
    if change.trust is not None:
        req["trust"] = int(change.trust)
    if change.link_state is not None:
        req["link_state"] = link_state_code(change.link_state)
    if change.min_tx_rate is not None or change.max_tx_rate is not None:
        req["rate"] = {
            "min_tx_rate": _keep(change.min_tx_rate, cur.min_tx_rate),
            "max_tx_rate": _keep(change.max_tx_rate, cur.max_tx_rate),
        }
    if change.node_guid is not None:
        req["ib_node_guid"] = guid_to_pyroute2(change.node_guid)
    if change.port_guid is not None:
        req["ib_port_guid"] = guid_to_pyroute2(change.port_guid)
    return req


def _field(attrs: Mapping[str, Any], nla: str, key: str) -> Any:
    value = attrs.get(nla)
    return value.get(key) if isinstance(value, Mapping) else None


def _flag(value: int | None) -> bool | None:
    return None if value is None or value == UNREPORTED else bool(value)


def _guid(value: Any, key: str) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get(key), str):
        return guid_from_pyroute2(value[key])
    return guid_from_raw(value) if isinstance(value, bytes) else None


def vf_settings(attrs: Mapping[str, Any], position: int) -> VfSettings:
    """VfSettings from one IFLA_VF_INFO's attributes as pyroute2 decodes them {nla: value}."""
    index = next((v["vf"] for v in attrs.values() if isinstance(v, Mapping) and "vf" in v), None)
    state = _field(attrs, "IFLA_VF_LINK_STATE", "link_state")
    return VfSettings(
        index=position if index is None else index,
        mac=_field(attrs, "IFLA_VF_MAC", "mac"),
        vlan=_field(attrs, "IFLA_VF_VLAN", "vlan") or 0,
        qos=_field(attrs, "IFLA_VF_VLAN", "qos") or 0,
        spoofchk=_flag(_field(attrs, "IFLA_VF_SPOOFCHK", "spoofchk")),
        trust=_flag(_field(attrs, "IFLA_VF_TRUST", "trust")),
        link_state=None if state is None else link_state_name(state),
        min_tx_rate=_field(attrs, "IFLA_VF_RATE", "min_tx_rate") or 0,
        max_tx_rate=_field(attrs, "IFLA_VF_RATE", "max_tx_rate") or 0,
        node_guid=_guid(attrs.get("IFLA_VF_IB_NODE_GUID"), "ib_node_guid"),
        port_guid=_guid(attrs.get("IFLA_VF_IB_PORT_GUID"), "ib_port_guid"),
    )


def link_info(msg: Any) -> LinkInfo:
    """LinkInfo from a decoded RTM_NEWLINK message."""
    return LinkInfo(
        ifindex=msg["index"],
        name=msg.get("IFLA_IFNAME"),
        mtu=msg.get("IFLA_MTU") or 0,
        up=bool(msg["flags"] & IFF_UP),
        address=msg.get("IFLA_ADDRESS") or "",
        link_type=msg["ifi_type"],
        num_vf=msg.get("IFLA_NUM_VF") or 0,
        altnames=altnames_of(msg),
    )


def altnames_of(msg: Any) -> tuple[str, ...]:
    """The alternative names of a decoded RTM_NEWLINK message (IFLA_PROP_LIST/IFLA_ALT_IFNAME)."""
    props = msg.get_attr("IFLA_PROP_LIST") if hasattr(msg, "get_attr") else None
    return tuple(props.get_attrs("IFLA_ALT_IFNAME")) if props else ()


def vfs_of(msg: Any) -> list[VfSettings]:
    """The VF list of a decoded RTM_NEWLINK message (asked for with RTEXT_FILTER_VF)."""
    vflist = msg.get("IFLA_VFINFO_LIST")
    infos = vflist.get_attrs("IFLA_VF_INFO") if vflist else []
    found = [vf_settings({a[0]: a[1] for a in info["attrs"]}, i) for i, info in enumerate(infos)]
    return sorted(found, key=lambda s: s.index)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Any failure inside becomes NetlinkError("<what>: <reason>")."""
    try:
        yield
    except NetlinkError:
        raise
    except PyrouteNetlinkError as e:
        code = abs(e.code) or errno.EIO
        raise NetlinkError(code, f"{what}: {os.strerror(code)}") from e
    except OSError as e:
        code = e.errno or errno.EIO
        raise NetlinkError(code, f"{what}: {e.strerror or e}") from e
    except (ValueError, TypeError, KeyError, struct.error) as e:
        raise NetlinkError(errno.EINVAL, f"{what}: {e}") from e


class _Serialized:
    """Calls to the wrapped IPRoute one at a time (its sync API is not documented thread-safe)."""

    def __init__(self, ipr: Any) -> None:
        self._ipr, self._lock = ipr, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._ipr, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return call


class PyrouteNetlink(L3Mixin):
    """`Netlink` on this node's kernel (or inside network namespace `netns`, which must exist)."""

    def __init__(self, netns: str | None = None) -> None:
        with _translated(f"open rtnetlink in network namespace {netns or '(current)'}"):
            ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
        # One request at a time on the socket: the restore calls in from several threads.
        self._ipr = _Serialized(ipr)

    def _get(self, name: str) -> Any | None:
        if not 0 < len(name.encode()) < IFNAMSIZ or "/" in name:
            return None  # no netdev can carry that name
        try:
            with _translated(f"get {name}"):
                return self._ipr.link("get", ifname=name, ext_mask=RTEXT_FILTER_VF)[0]
        except NetlinkError as e:
            if e.errno == errno.ENODEV:
                return None
            raise

    def _require(self, name: str) -> Any:
        msg = self._get(name)
        if msg is None:
            raise NetlinkError(errno.ENODEV, f"no netdev named {name}")
        return msg

    def link(self, name: str) -> LinkInfo | None:
        msg = self._get(name)
        return None if msg is None else link_info(msg)

    def links(self) -> list[LinkInfo]:
        with _translated("list links"):
            return [link_info(m) for m in self._ipr.get_links(ext_mask=RTEXT_FILTER_VF)]

    def vfs(self, pf: str) -> list[VfSettings]:
        msg = self._require(pf)
        with _translated(f"read VFs of {pf}"):
            return vfs_of(msg)

    def set_vf(self, pf: str, vf: int, change: VfChange) -> None:
        if change.is_empty():
            return
        fields = ", ".join(f"{k}={v}" for k, v in asdict(change).items() if v is not None)
        what = f"set VF {vf} {fields} on {pf}"
        msg = self._require(pf)
        with _translated(what):
            paired = (change.vlan, change.qos), (change.min_tx_rate, change.max_tx_rate)
            halves = any((a is None) != (b is None) for a, b in paired)
            current = next((s for s in vfs_of(msg) if s.index == vf), None) if halves else None
            request = [vf_request(vf, part, current) for part in vf_infos(change)]
            self._ipr.link("set", index=msg["index"], vf=copy.deepcopy(request))

    def set_vfs(self, pf: str, changes: Mapping[int, VfChange]) -> None:
        changes = {vf: c for vf, c in changes.items() if not c.is_empty()}
        if not changes:
            return
        msg = self._require(pf)
        with _translated(f"set {len(changes)} VFs ({', '.join(map(str, changes))}) on {pf}"):
            current = {s.index: s for s in vfs_of(msg)}
            request = [vf_request(vf, part, current.get(vf)) for vf, c in sorted(changes.items())
                       for part in vf_infos(c)]
            self._ipr.link("set", index=msg["index"], vf=copy.deepcopy(request))

    def set_link(self, name: str, change: LinkChange) -> None:
        """Down first, then rename, MTU, address, extra pyroute2 link keywords, and up last."""
        index = self._require(name)["index"]
        steps: list[tuple[str, dict[str, Any]]] = []
        if change.up is False:
            steps.append(("set down", {"state": "down"}))
        if change.name is not None and change.name != name:
            steps.append((f"rename to {change.name}", {"ifname": change.name}))
        if change.mtu is not None:
            steps.append((f"set mtu {change.mtu}", {"mtu": change.mtu}))
        if change.address is not None:
            steps.append((f"set address {change.address}", {"address": change.address}))
        if change.extra:
            steps.append((f"set {change.extra}", dict(change.extra)))
        if change.up is True:
            steps.append(("set up", {"state": "up"}))
        current = name
        for op, kwargs in steps:
            with _translated(f"{op} on {current}"):
                self._ipr.link("set", index=index, **kwargs)
            current = kwargs.get("ifname", current)

    def del_altname(self, name: str, altname: str) -> None:
        index = self._require(name)["index"]
        with _translated(f"delete altname {altname} of {name}"):
            self._ipr.link("property_del", index=index, altname=altname)

    def close(self) -> None:
        with _translated("close rtnetlink"):
            self._ipr.close()
