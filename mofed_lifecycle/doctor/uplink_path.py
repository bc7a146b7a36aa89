"""Where the node's uplink goes down to the ConnectX PFs (read-only: /proc, sysfs).

The default route's netdev (else the one holding NODE_IP, the node's IP), then what is stacked
under it (a bond's slaves, a VLAN's parent, recursively, by sysfs `lower_*`): the ConnectX PFs
among them are the ones whose reload takes the node's uplink down. A bond survives its slaves'
reload (they are enslaved again); a VLAN or macvlan stacked directly on a PF is destroyed with it
and is not recreated by the daemon.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..host.files import read_value
from ..host.node import Tools
from .rdma_config import Device

RTF_ADDRCONF = 0x00040000  # a route from an IPv6 router advertisement


@dataclass(frozen=True)
class UplinkPath:
    route_dev: str  # the default route's netdev (or the node IP's)
    pfs: dict[str, str] = field(default_factory=dict)  # ConnectX PF netdev -> its PCI address
    dies_with_pf: tuple[str, ...] = ()  # stacked directly on a PF, not a bond: destroyed with it
    source: str = "/proc/net/route"  # where the default route was read
    carries: str = "default route"  # or "node IP 10.0.0.7" (NODE_IP)
    default_by_ra: bool = False  # an IPv6 default route from router advertisements (comes back)

    @property
    def first(self) -> tuple[str, str]:
        """(PF netdev, PCI) of the first ConnectX PF under the route."""
        return next(iter(self.pfs.items()))


def default_route(tools: Tools) -> tuple[str, str, bool] | None:
    """(the default route's netdev, the file that says so, whether it is an IPv6 router
    advertisement's): IPv4's (/proc/net/route), else IPv6's (/proc/net/ipv6_route)."""
    for line in read_value(tools.paths.resolve("/proc/net/route")).splitlines()[1:]:
        f = line.split()
        if len(f) > 7 and f[1] == "00000000" and f[7] == "00000000":
            return f[0], "/proc/net/route", False
    for line in read_value(tools.paths.resolve("/proc/net/ipv6_route")).splitlines():
        f = line.split()  # dst, dst len, src, src len, next hop, metric, refcnt, use, flags, dev
        if len(f) == 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo":
            try:
                ra = bool(int(f[8], 16) & RTF_ADDRCONF)
            except ValueError:
                ra = False
            return f[9], "/proc/net/ipv6_route", ra
    return None


def default_route_dev(tools: Tools) -> str | None:
    found = default_route(tools)
    return found[0] if found else None


def node_ip_dev(tools: Tools, node_ip: str) -> tuple[str, str] | None:
    """(the netdev holding `node_ip`, the file that says so): an IPv6 address from
    /proc/net/if_inet6; an IPv4 one by the longest directly connected route (no gateway) of
    /proc/net/route that contains it, the prefix route its address made."""
    try:
        ip = ipaddress.ip_address(node_ip)
    except ValueError:
        return None
    if ip.version == 6:
        for line in read_value(tools.paths.resolve("/proc/net/if_inet6")).splitlines():
            f = line.split()  # address, ifindex, prefix length, scope, flags, name
            if len(f) == 6 and f[0].lower() == ip.exploded.replace(":", ""):
                return f[5], "/proc/net/if_inet6"
        return None
    best: tuple[int, str] | None = None
    for line in read_value(tools.paths.resolve("/proc/net/route")).splitlines()[1:]:
        f = line.split()
        try:  # the kernel prints them in host (little-endian) byte order
            dst, gw, mask = (ipaddress.IPv4Address(bytes.fromhex(x)[::-1]) for x in
                             (f[1], f[2], f[7]))
            net = ipaddress.IPv4Network(f"{dst}/{mask}")
        except (IndexError, ValueError):
            continue
        if int(gw) == 0 and net.prefixlen > 0 and ip in net and (
                best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, f[0])
    return (best[1], "/proc/net/route") if best else None


def direct_lowers(tools: Tools, dev: str) -> list[str]:
    d = tools.paths.resolve(f"/sys/class/net/{dev}")
    return sorted(p.name.removeprefix("lower_") for p in d.glob("lower_*")) if d.is_dir() else []


def lowers(tools: Tools, dev: str) -> list[str]:
    """The netdevs under `dev` (a bond's slaves, a VLAN's parent), recursively."""
    return [x for n in direct_lowers(tools, dev) for x in (n, *lowers(tools, n))]


def is_bond(tools: Tools, dev: str) -> bool:
    return tools.paths.resolve(f"/sys/class/net/{dev}/bonding").is_dir()


def uplink_path(tools: Tools, devices: list[Device], pfs: set[str] | dict[str, Path],
                node_ip: str = "") -> UplinkPath | None:
    """The uplink's path down to the ConnectX PFs `pfs` (PCI addresses): the default route's
    netdev's, else (`node_ip`, NODE_IP) the netdev holding the node's IP; None when neither goes
    through a ConnectX PF."""
    route = default_route(tools)
    if route is not None and (up := _path(tools, devices, pfs, route[0], route[1])) is not None:
        return replace(up, default_by_ra=route[2])
    by_ip = node_ip_dev(tools, node_ip) if node_ip else None
    if by_ip is not None and (up := _path(tools, devices, pfs, *by_ip)) is not None:
        return replace(up, carries=f"node IP {node_ip}")
    return None


def _path(tools: Tools, devices: list[Device], pfs: set[str] | dict[str, Path], dev: str,
          source: str) -> UplinkPath | None:
    chain = [dev, *lowers(tools, dev)]
    found: dict[str, str] = {}
    for name in dict.fromkeys(chain):
        owner = next((d for d in devices if name in d.netdevs and d.pci in pfs), None)
        if owner is not None:
            found[name] = owner.pci
    if not found:
        return None
    dies = tuple(n for n in dict.fromkeys(chain) if n not in found and not is_bond(tools, n)
                 and any(x in found for x in direct_lowers(tools, n)))
    return UplinkPath(dev, found, dies, source)
