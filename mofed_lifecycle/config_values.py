"""The value parsers of the environment contract: text -> typed value, or ValueError saying what
is accepted (config.py turns it into a ConfigError naming the variable)."""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from pathlib import PurePosixPath

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,55}$")  # the kernel's MODULE_NAME_LEN is 56
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~:-]{0,63}$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# ---- value parsers: text -> typed value, or ValueError("what is accepted") ----------------------


def parse_bool(text: str) -> bool:
    word = text.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("expected a boolean: true/false, 1/0 or yes/no (any case)")


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds, 0 or more (e.g. 4 or 0.5)") from None
    if not (value >= 0 and value != float("inf")):
        raise ValueError("expected a number of seconds, 0 or more (e.g. 4 or 0.5)")
    return value


def seconds_in(lo: float, hi: float) -> Callable[[str], float]:
    """A parser of seconds within [lo, hi]: a sane range checked at start, so that no value can
    overflow a timer or busy-loop a thread later (9999999 s, 1e300 s, 1e-9 s are refused)."""
    def parse(text: str) -> float:
        value = parse_seconds(text)
        if not lo <= value <= hi:
            raise ValueError(f"expected seconds from {lo:g} to {hi:g}, got {text}")
        return value

    return parse


def parse_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100:
        raise ValueError("expected a whole number from 1 to 100")
    return int(text)


def _module_list(sep: str, what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in (p.strip() for p in text.split(sep)) if n)
        bad = next((n for n in names if not MODULE_NAME_RE.match(n)), None)
        if bad is not None:
            raise ValueError(f"expected {what} kernel module names (letters, digits, _ and -); "
                             f"{bad!r} is not one")
        return tuple(n.replace("-", "_") for n in names)

    return parse


parse_space_modules = _module_list(" ", "space-separated")
_colon_modules = _module_list(":", "colon-separated")


def parse_blacklist_modules(text: str) -> tuple[str, ...]:
    """The modules blacklisted around the reload: never empty (without a blacklist the host's udev
    loads its own mlx5_core while openibd has the stack unloaded, and the VFs are lost)."""
    names = _colon_modules(text)
    if not names:
        raise ValueError("expected at least one module (mlx5_core first): an empty blacklist lets "
                         "the host reload its own driver in the middle of the swap")
    return names


def parse_abs_path(text: str) -> str:
    p = PurePosixPath(text)
    if not p.is_absolute() or CONTROL_RE.search(text):
        raise ValueError("expected an absolute path (starting with /)")
    if ".." in p.parts:
        raise ValueError("expected an absolute path without '..'")
    return str(p)


def parse_optional_abs_path(text: str) -> str:
    return parse_abs_path(text) if text else ""


SYSTEM_DIRS = frozenset({"/", "/etc", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/boot", "/dev",
                         "/home", "/mnt", "/opt", "/proc", "/root", "/run", "/srv", "/sys", "/tmp",
                         "/var", "/var/opt", "/var/lib", "/host", "/run/mellanox",
                         "/run/mellanox/drivers"})


def parse_inventory_path(text: str) -> str:
    """The build cache: a directory of its own (other kernels' entries in it are deleted)."""
    if not text:
        return ""
    path = parse_abs_path(text)
    inside_host = path.startswith("/host/") and path.count("/") <= 2
    if path in SYSTEM_DIRS or inside_host or (path.startswith("/host/") and
                                               path[len("/host"):] in SYSTEM_DIRS):
        raise ValueError("a system directory: the build cache deletes other kernels' and "
                         "versions' entries in it; use a directory of its own, e.g. "
                         "/mnt/drivers-inventory (the operator's)")
    return path


def parse_modprobe_conf(text: str) -> str:
    path = parse_abs_path(text)
    if not path.endswith(".conf"):
        raise ValueError("expected an absolute path ending in .conf (modprobe ignores other files "
                         "in modprobe.d), e.g. /host/etc/modprobe.d/blacklist-ofed-modules.conf")
    return path


def parse_version(text: str) -> str:
    if not VERSION_RE.match(text):
        raise ValueError("expected a driver version such as 25.07-0.9.7 (letters, digits, . _ + ~ "
                         ": -; at most 64 characters)")
    return text


def parse_prom_path(text: str) -> str:
    if not text:
        return ""
    path = parse_abs_path(text)
    if not path.endswith(".prom"):
        raise ValueError("expected an absolute path ending in .prom (node_exporter's textfile "
                         "collector reads only *.prom), or empty to turn metrics off")
    return path


MODULE_PARAM_RE = re.compile(r"^[A-Za-z0-9_]{1,64}=[^\s\x00-\x1f\x7f;&|`$<>]*$")


def parse_module_params(text: str) -> tuple[str, ...]:
    params = tuple(text.split())
    bad = next((p for p in params if not MODULE_PARAM_RE.match(p)), None)
    if bad is not None:
        raise ValueError(f"expected space-separated module parameters name=value; {bad!r} is "
                         "not one")
    return params


def parse_refused_true(text: str) -> bool:
    if parse_bool(text):
        raise ValueError("not implemented by mofed-lifecycle (runtime DKMS); unset it or set "
                         "false: `run sources` builds the driver with install.pl into the "
                         "inventory (NVIDIA_NIC_DRIVERS_INVENTORY_PATH), which a restart reuses")
    return False


def parse_refused_secret(text: str) -> str:
    if text:
        raise ValueError("not implemented by mofed-lifecycle (attaching Ubuntu Pro to install "
                         "ESM kernel headers at start); unset it and put the kernel headers in "
                         "the image")
    return ""


def parse_build_flags(text: str) -> str:
    text = parse_text(text)
    try:
        shlex.split(text)
    except ValueError:
        raise ValueError("expected install.pl flags as shell words (unbalanced quotes), e.g. "
                         "--with-nfsrdma \"--with-foo=a b\"") from None
    return text


def parse_udev_rules_path(text: str) -> str:
    path = parse_abs_path(text)
    if not path.endswith(".rules"):
        raise ValueError("expected an absolute path ending in .rules (udev reads only *.rules), "
                         "e.g. /host/etc/udev/rules.d/77-mlnx-net-names.rules")
    return path


def parse_uplink_policy(text: str) -> str:
    if text.lower() not in ("restore", "refuse", "ignore"):
        raise ValueError("expected restore (save and re-apply its addresses and routes), refuse "
                         "(refuse the reload) or ignore (only warn)")
    return text.lower()


def parse_node_ip(text: str) -> str:
    """An IPv4 or IPv6 address, or empty (none given)."""
    if not text.strip():
        return ""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError("expected the node's IP address (IPv4 or IPv6, no prefix), e.g. "
                         "10.0.0.7, or empty") from None


def parse_text(text: str) -> str:
    if CONTROL_RE.search(text):
        raise ValueError("expected printable text on one line (no control characters)")
    return text
