"""The netlink seam: typed link and VF facts, and the narrow interface the daemon uses.

Two implementations exist: `host.netlink.PyrouteNetlink` (pyroute2, a real node) and
`sim.netlink.SimNetlink` (the simulated node's kernel). The daemon only sees `Netlink`.
Links and VFs are named by what is stable: a link by its ifname (resolved at the moment of use),
a VF by (PF ifname, VF index).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

LinkState = Literal["auto", "enable", "disable"]
ZERO_GUID = "00:00:00:00:00:00:00:00"
ZERO_MAC = "00:00:00:00:00:00"

# ARPHRD_* values as read from /sys/class/net/X/type
ARPHRD_ETHER = 1
ARPHRD_INFINIBAND = 32


class NetlinkError(OSError):
    """A netlink request the kernel refused; `errno` says why (ENODEV, EBUSY, EINVAL...)."""


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel holds for one netdev now."""

    ifindex: int
    name: str
    mtu: int
    up: bool  # administrative state (IFF_UP)
    address: str  # MAC (Ethernet) or 20-byte IPoIB hardware address, colon-separated
    link_type: int  # ARPHRD_*: 1 Ethernet, 32 InfiniBand
    num_vf: int = 0
    altnames: tuple[str, ...] = ()  # alternative names (udev adds the old name after a rename)


@dataclass(frozen=True)
class VfSettings:
    """One VF's settings as held by its PF (IFLA_VF_*). None: not reported / not applicable."""

    index: int
    mac: str | None = None
    vlan: int = 0
    qos: int = 0
    spoofchk: bool | None = None
    trust: bool | None = None
    link_state: LinkState | None = None
    min_tx_rate: int = 0  # Mbit/s
    max_tx_rate: int = 0  # Mbit/s
    node_guid: str | None = None  # IB only; colon-separated 8 bytes
    port_guid: str | None = None


@dataclass(frozen=True)
class VfChange:
    """Settings to apply to one VF through its PF; fields left None are not touched."""

    mac: str | None = None
    vlan: int | None = None
    qos: int | None = None
    spoofchk: bool | None = None
    trust: bool | None = None
    link_state: LinkState | None = None
    min_tx_rate: int | None = None
    max_tx_rate: int | None = None
    node_guid: str | None = None
    port_guid: str | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__dataclass_fields__)


def vf_infos(change: VfChange) -> list[VfChange]:
    """The `IFLA_VF_INFO`s that carry `change`: the kernel applies `IFLA_VF_IB_NODE_GUID` and
    returns, silently ignoring a port GUID in the same VF-info (seen on Linux 6.1), so a port GUID
    always travels in a VF-info of its own."""
    if change.port_guid is None:
        return [] if change.is_empty() else [change]
    rest = replace(change, port_guid=None)
    return [c for c in (rest, VfChange(port_guid=change.port_guid)) if not c.is_empty()]


@dataclass(frozen=True)
class LinkChange:
    """Link-level changes on a netdev; fields left None are not touched."""

    mtu: int | None = None
    up: bool | None = None
    address: str | None = None
    name: str | None = None  # rename (the link must be down on a real kernel)
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """One route through a netdev (the uplink protection's): `dst` "default" or a CIDR; `family`
    4 or 6 (an IPv6 default is not an IPv4 one); `scope` the kernel's rtm_scope (0 universe,
    253 link: a route without a gateway); `onlink` a gateway outside the netdev's subnets; `src`
    the preferred source address."""

    dst: str
    gateway: str | None = None
    priority: int | None = None
    family: int = 4
    scope: int = 0
    onlink: bool = False
    src: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"dst": self.dst, "gateway": self.gateway, "priority": self.priority,
                "family": self.family, "scope": self.scope, "onlink": self.onlink,
                "src": self.src}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Route:
        family = d.get("family") or (6 if ":" in f"{d['dst']}{d.get('gateway') or ''}" else 4)
        return cls(str(d["dst"]), d.get("gateway"), d.get("priority"), int(family),
                   int(d.get("scope") or 0), bool(d.get("onlink")), d.get("src"))


class Netlink(Protocol):
    """The operations the daemon performs over rtnetlink. Raise NetlinkError on refusal."""

    def link(self, name: str) -> LinkInfo | None:
        """The link called `name` now, or None if no such netdev exists."""
        ...

    def links(self) -> list[LinkInfo]:
        """Every netdev in this network namespace."""
        ...

    def vfs(self, pf: str) -> list[VfSettings]:
        """The VF info list of PF `pf` (IFLA_VFINFO_LIST), ordered by VF index."""
        ...

    def set_vf(self, pf: str, vf: int, change: VfChange) -> None:
        """Apply `change` to VF `vf` of PF `pf` (IFLA_VF_* through the PF)."""
        ...

    def set_vfs(self, pf: str, changes: Mapping[int, VfChange]) -> None:
        """Apply several VFs' changes in one request (one IFLA_VFINFO_LIST with an IFLA_VF_INFO
        per VF; the kernel applies them in order and stops at the first refusal)."""
        ...

    def set_link(self, name: str, change: LinkChange) -> None:
        """Apply link-level `change` to netdev `name`."""
        ...

    def del_altname(self, name: str, altname: str) -> None:
        """Remove alternative name `altname` of netdev `name` (RTM_DELLINKPROP)."""
        ...

    # the uplink's layer 3 (host/netlink_l3.py): adding what is there already is no error
    def addresses(self, name: str) -> list[str]: ...

    def add_address(self, name: str, cidr: str) -> None:
        """Add `cidr` to `name`, permanent (there already: no error)."""
        ...

    def address_lifetimes(self, name: str) -> dict[str, tuple[int, int]]:
        """The addresses of `name` that have a lifetime (a DHCP lease): CIDR -> (valid,
        preferred) seconds left."""
        ...

    def routes(self, name: str) -> list[Route]: ...

    def add_route(self, name: str, route: Route) -> None: ...

    def master(self, name: str) -> str | None: ...

    def set_master(self, name: str, master: str) -> None: ...

    def close(self) -> None: ...
