"""The simulated side of the netlink seam: `Netlink` answered by the node's kernel process."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ..host.netlink_types import (
    LinkChange,
    LinkInfo,
    NetlinkError,
    Route,
    VfChange,
    VfSettings,
    vf_infos,
)
from .client import KernelClient, PerThreadClient
from .errors import SimKernelError


def _info(d: dict[str, object]) -> LinkInfo:
    return LinkInfo(**{**d, "altnames": tuple(d.get("altnames") or ())})  # type: ignore[arg-type]


class SimNetlink:
    """Same interface and errors as `host.netlink.PyrouteNetlink`, on a simulated node."""

    def __init__(self, client: KernelClient | PerThreadClient) -> None:
        self.client = client

    def _call(self, what: str, op: str, **args: object) -> object:
        try:
            return self.client.call(op, **args)
        except SimKernelError as e:
            raise NetlinkError(e.errno, f"{what}: {e.strerror}") from None

    def link(self, name: str) -> LinkInfo | None:
        d: Any = self._call(f"get {name}", "nl_link", name=name)
        return _info(d) if d else None

    def links(self) -> list[LinkInfo]:
        rows: Any = self._call("list links", "nl_links")
        return [_info(d) for d in rows]

    def vfs(self, pf: str) -> list[VfSettings]:
        rows: Any = self._call(f"list VFs of {pf}", "nl_vfs", pf=pf)
        return [VfSettings(**d) for d in rows]

    def set_vf(self, pf: str, vf: int, change: VfChange) -> None:
        self.set_vfs(pf, {vf: change}, what=f"set VF {vf} of {pf} "
                     f"{ {k: v for k, v in asdict(change).items() if v is not None} }")

    def set_vfs(self, pf: str, changes: Mapping[int, VfChange], what: str = "") -> None:
        # one entry per IFLA_VF_INFO, as the kernel receives them (the port GUID in its own)
        infos = [[vf, {k: v for k, v in asdict(part).items() if v is not None}]
                 for vf, c in sorted(changes.items()) for part in vf_infos(c)]
        self._call(what or f"set {len(changes)} VFs of {pf}", "nl_set_vfs", pf=pf, infos=infos)

    def set_link(self, name: str, change: LinkChange) -> None:
        fields = {k: v for k, v in asdict(change).items() if v is not None and k != "extra"}
        self._call(f"set {fields} on {name}", "nl_set_link", name=name, change=fields)

    def del_altname(self, name: str, altname: str) -> None:
        self._call(f"delete altname {altname} of {name}", "nl_del_altname", name=name,
                   altname=altname)

    # addresses and routes (host/netlink_l3.py's operations); a node without bonds
    def addresses(self, name: str) -> list[str]:
        rows: Any = self._call(f"list addresses of {name}", "nl_addrs", name=name)
        return [str(a) for a in rows]

    def address_lifetimes(self, name: str) -> dict[str, tuple[int, int]]:
        self.link(name)
        return {}  # the simulated node's addresses are all permanent

    def add_address(self, name: str, cidr: str) -> None:
        try:
            self._call(f"add address {cidr} to {name}", "nl_addr_add", name=name, cidr=cidr)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise

    def routes(self, name: str) -> list[Route]:
        rows: Any = self._call(f"list routes through {name}", "nl_routes", name=name)
        return [Route.from_json(r) for r in rows]

    def add_route(self, name: str, route: Route) -> None:
        try:
            self._call(f"add route {route.dst} dev {name}", "nl_route_add", name=name,
                       dst=route.dst)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise

    def master(self, name: str) -> str | None:
        self.link(name)
        return None

    def set_master(self, name: str, master: str) -> None:
        raise NetlinkError(errno.EOPNOTSUPP, "the simulated node has no bonds")

    def close(self) -> None:
        """The client belongs to the node; it is closed with it."""
