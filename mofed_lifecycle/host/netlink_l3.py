"""Addresses, routes and bond membership over rtnetlink: what the uplink protection saves before a
driver reload and re-applies when the PF is back (lifecycle/uplink.py).

`L3Mixin` gives `PyrouteNetlink` these operations on its IPRoute socket; the simulated node's
netlink has the same methods. Adding what is there already is no error (EEXIST is success).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from .netlink_types import NetlinkError, Route

RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_RA = 2, 9
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
IFA_F_PERMANENT = 0x80


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class L3Mixin:
    """For PyrouteNetlink: `_ipr`, `_require` and `_translated` come from it."""

    _ipr: Any

    def _require(self, name: str) -> Any:  # pragma: no cover - PyrouteNetlink's
        raise NotImplementedError

    def _index(self, name: str) -> int:
        return int(self._require(name)["index"])

    def addresses(self, name: str) -> list[str]:
        """The IPv4 and the static global IPv6 addresses of `name`, as CIDR."""
        from .netlink import _translated

        index = self._index(name)
        with _translated(f"list addresses of {name}"):
            msgs = self._ipr.get_addr(index=index)
        out = []
        for m in msgs:
            addr = _attr(m, "IFA_ADDRESS")
            flags = _attr(m, "IFA_FLAGS") or m["flags"]
            if addr is None or (m["family"] == socket.AF_INET6 and (
                    m["scope"] != 0 or not flags & IFA_F_PERMANENT)):
                continue  # link-local and autoconfigured IPv6 come back by themselves
            out.append(f"{addr}/{m['prefixlen']}")
        return out

    def address_lifetimes(self, name: str) -> dict[str, tuple[int, int]]:
        """The IPv4 addresses of `name` with a lifetime (a DHCP lease, not IFA_F_PERMANENT):
        CIDR -> (valid, preferred) seconds left, as the kernel counts them."""
        from .netlink import _translated

        index = self._index(name)
        with _translated(f"list addresses of {name}"):
            msgs = self._ipr.get_addr(index=index, family=socket.AF_INET)
        out = {}
        for m in msgs:
            addr, info = _attr(m, "IFA_ADDRESS"), _attr(m, "IFA_CACHEINFO")
            flags = _attr(m, "IFA_FLAGS") or m["flags"]
            if addr and info and not flags & IFA_F_PERMANENT:
                out[f"{addr}/{m['prefixlen']}"] = (int(info["ifa_valid"]),
                                                   int(info["ifa_preferred"]))
        return out

    def add_address(self, name: str, cidr: str) -> None:
        from .netlink import _translated

        address, _, prefix = cidr.partition("/")
        index = self._index(name)
        try:
            with _translated(f"add address {cidr} to {name}"):
                self._ipr.addr("add", index=index, address=address, prefixlen=int(prefix))
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise

    def routes(self, name: str) -> list[Route]:
        """The main table's IPv4 and IPv6 routes through `name`, minus what comes back by itself
        (the kernel's prefix routes of its addresses, IPv6 router advertisements' and
        link-local ones)."""
        from .netlink import _translated

        index = self._index(name)
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            with _translated(f"list routes through {name}"):
                msgs = self._ipr.get_routes(family=family, table=RT_TABLE_MAIN, oif=index)
            for m in msgs:
                if m["proto"] in (RTPROT_KERNEL, RTPROT_RA) or m["type"] != RTN_UNICAST:
                    continue
                dst = _attr(m, "RTA_DST")
                if family == socket.AF_INET6 and str(dst or "").lower().startswith("fe80:"):
                    continue
                out.append(Route(f"{dst}/{m['dst_len']}" if dst else "default",
                                 _attr(m, "RTA_GATEWAY"), _attr(m, "RTA_PRIORITY"),
                                 6 if family == socket.AF_INET6 else 4, int(m["scope"]),
                                 bool(m["flags"] & RTNH_F_ONLINK), _attr(m, "RTA_PREFSRC")))
        return out

    def add_route(self, name: str, route: Route) -> None:
        from .netlink import _translated

        v6 = route.family == 6
        kwargs: dict[str, Any] = {"oif": self._index(name), "table": RT_TABLE_MAIN,
                                  "family": socket.AF_INET6 if v6 else socket.AF_INET,
                                  "scope": route.scope}
        kwargs["dst"] = ("::/0" if v6 else "0.0.0.0/0") if route.dst == "default" else route.dst
        if route.gateway:
            kwargs["gateway"] = route.gateway
        if route.priority is not None:
            kwargs["priority"] = route.priority
        if route.onlink:
            kwargs["flags"] = RTNH_F_ONLINK
        if route.src:
            kwargs["prefsrc"] = route.src
        try:
            with _translated(f"add route {route.dst} via {route.gateway} dev {name}"):
                self._ipr.route("add", **kwargs)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise

    def master(self, name: str) -> str | None:
        """The bond (or bridge) `name` is enslaved to, if any."""
        from .netlink import _translated

        msg = self._require(name)
        index = _attr(msg, "IFLA_MASTER")
        if not index:
            return None
        with _translated(f"get the master of {name}"):
            return str(_attr(self._ipr.link("get", index=index)[0], "IFLA_IFNAME"))

    def set_master(self, name: str, master: str) -> None:
        from .netlink import _translated

        with _translated(f"enslave {name} to {master}"):
            self._ipr.link("set", index=self._index(name), master=self._index(master))
