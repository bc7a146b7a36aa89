"""CREATE_IFNAMES_UDEV: keep the inbox driver's short interface names across the driver swap.

The vendor driver's ConnectX netdevs get systemd's "new" names with a port suffix (`enp8s0f0np0`,
VFs `enp8s0f0np0v3`) where the inbox driver of older distributions gave `enp8s0f0`: names in the
node's network configuration would no longer match after the swap. With CREATE_IFNAMES_UDEV=true,
a stale rule file (MLX_UDEV_RULES_FILE) is removed at start and stop, and the rule stripping the
suffix is written at start when the node's ConnectX netdevs carry short names now. Only files
with our header, or upstream's rule (its label), are ever removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..log import get_logger
from .files import atomic_write_text, remove_file
from .paths import NodePaths

HEADER = "# Written by mofed-lifecycle (CREATE_IFNAMES_UDEV=true); removed when it stops.\n"
LABEL = "mofed_lifecycle_ifnames_end"
UPSTREAM_LABEL = "mlnx_ofed_name_end"
NEW_SCHEME = re.compile(r"np[0-3](v\d+)?$")
STRIP = "sed -r -e s/np[01]$// -e s/np[01]v/v/"

RULE = HEADER + f"""ACTION!="add", GOTO="{LABEL}"
SUBSYSTEM!="net", GOTO="{LABEL}"
# enp8s0f0np0 -> enp8s0f0, enp8s0f0np1v12 -> enp8s0f0v12 (ConnectX PFs and VFs)
DRIVERS=="mlx5_core", ENV{{ID_NET_NAME_PATH}}!="", \\
  PROGRAM="/bin/sh -c 'echo $env{{ID_NET_NAME_PATH}} | {STRIP}'", ENV{{ID_NET_NAME_PATH}}="$result"
DRIVERS=="mlx5_core", ENV{{ID_NET_NAME_SLOT}}!="", \\
  PROGRAM="/bin/sh -c 'echo $env{{ID_NET_NAME_SLOT}} | {STRIP}'", ENV{{ID_NET_NAME_SLOT}}="$result"
LABEL="{LABEL}"
"""


def connectx_netdevs(paths: NodePaths) -> list[str]:
    """Netdevs whose PCI device is driven by mlx5_core now."""
    out: list[str] = []
    net = paths.resolve("/sys/class/net")
    if not net.is_dir():
        return out
    for nd in sorted(net.iterdir()):
        driver = nd / "device" / "driver"
        try:
            if driver.is_symlink() and Path(driver.readlink()).name == "mlx5_core":
                out.append(nd.name)
        except OSError:
            continue
    return out


def ours(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return text.startswith(HEADER) or UPSTREAM_LABEL in text


def remove_stale_rule(path: Path) -> bool:
    """Remove a rule file left by us or by upstream's container; True if one was removed."""
    log = get_logger("udev-rules")
    if not path.exists():
        return False
    if not ours(path):
        log.warning("udev_rule.not_ours", path=str(path),
                    why="a file without our header or upstream's rule is at MLX_UDEV_RULES_FILE: "
                        "left alone; point MLX_UDEV_RULES_FILE elsewhere")
        return False
    remove_file(path)
    log.info("udev_rule.removed", path=str(path))
    return True


def install_rule(paths: NodePaths, path: Path) -> bool:
    """At start, with CREATE_IFNAMES_UDEV=true: write the rule if the node's ConnectX netdevs
    have short names now (none ends in `npN`). True if written."""
    log = get_logger("udev-rules")
    remove_stale_rule(path)
    if path.exists():  # not ours: left alone (said above)
        return False
    names = connectx_netdevs(paths)
    if not names:
        log.info("udev_rule.skipped", why="no ConnectX netdev on the node now: the naming scheme "
                 "in use cannot be told, and a rule is written only to keep short names")
        return False
    if any(NEW_SCHEME.search(n) for n in names):
        log.info("udev_rule.skipped", netdevs=names,
                 why="the netdevs already use the port-suffixed names: nothing to keep")
        return False
    atomic_write_text(path, RULE)
    log.info("udev_rule.written", path=str(path), netdevs=names,
             why="keeps these short names once the vendor driver's netdevs appear")
    return True
