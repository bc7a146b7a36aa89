"""The simulated kernel's modules: load/unload with holders, modprobe's blacklist, openibd's swap.

`openibd restart` is two calls from the stand-in script around its own duration: `openibd_stop`
(refuse if a module outside the stack holds it, remove every VF and netdev, unload the stack) and
`openibd_start` (load the installed stack, bring the PFs back). Killing the script between them
leaves the node without a driver, as on a real node. While the stack is out, the host's udev tries
to load its own mlx5_core by alias: a `blacklist` line in `etc/modprobe.d` stops it, as it stops
modprobe.
"""

from __future__ import annotations

import errno
import re
from typing import TYPE_CHECKING, Any

from .model import Module
from .peermem_ko import find_peermem_ko, peer_crc, read_modversions
from .scenario import (
    AUX_DEPS,
    INBOX,
    PEER_SYMBOLS,
    STACK_DEPS,
    deps_for,
    peer_exporter,
    stack_modules,
)

if TYPE_CHECKING:
    from .kernel import SimKernel


class KernelError(OSError):
    """A refusal by the simulated kernel: errno plus a message in the real tool's words."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


def canon(name: str) -> str:
    return name.replace("-", "_")


class ModulesMixin:
    """Module operations of SimKernel (see kernel.py for the state and the clock)."""

    # ---- catalog of what is on disk ------------------------------------------------------
    def catalog_deps(self: SimKernel, name: str, version: str) -> tuple[str, ...]:
        for n, holds in self.sc.extra_modules:
            if n == name:
                return holds
        return deps_for(version, name)

    def installed(self: SimKernel, name: str, host_tree: bool = False) -> bool:
        """Whether `modprobe NAME` finds it. Where the driver is built on the node ([build]
        sources, dtk), the driver's modules are there once its packages are installed."""
        extra = {n for n, _ in self.sc.extra_modules}
        known = name in STACK_DEPS or name in AUX_DEPS or name in extra
        if known and self.sc.build.builds and not host_tree:
            return (self.root / "lib/modules" / self.sc.kernel / "updates" /
                    f"{name}.ko").is_file()
        return known or (name == "nvidia_peermem" and self.sc.gpu is not None)

    def blacklisted(self: SimKernel, *, by_udev: bool = False) -> set[str]:
        """Modules named by a `blacklist` line in any etc/modprobe.d/*.conf of the node.
        `by_udev`: as udev's alias load sees them: it re-reads modprobe.d lazily, so a file
        younger than `[udev] blacklist_lag_s` (scaled) is not seen yet (contract version 2)."""
        out: set[str] = set()
        now = self.event_time if self.event_time is not None else self.now()
        lag = self.sc.scaled(self.sc.blacklist_lag_s) if by_udev else 0.0
        for f in sorted((self.root / "etc/modprobe.d").glob("*.conf")):
            try:
                if lag and f.stat().st_mtime > now - lag:
                    continue
                text = f.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                m = re.match(r"^\s*blacklist\s+(\S+)", line)
                if m:
                    out.add(canon(m.group(1)))
        return out

    # ---- load / unload ------------------------------------------------------------------------
    def _insert(self: SimKernel, name: str, version: str, srcversion: str, uses: list[str]) -> None:
        self.st.modules[name] = Module(name, srcversion, version, uses)
        self.note("module.loaded", module=name, srcversion=srcversion, version=version)

    def hanging_loads(self: SimKernel, names: list[str]) -> list[str]:
        """The modules among `names` whose load would block forever (scenario `load_hangs`)."""
        return [canon(n) for n in names
                if canon(n) in self.sc.hanging_loads and canon(n) not in self.st.modules]

    def load_module(self: SimKernel, name: str, *, use_blacklist: bool = False,
                    host_tree: bool = False) -> list[str]:
        """`modprobe NAME`: load it and its dependencies from the installed tree (the driver
        container's `/lib/modules`) or, `host_tree` (`modprobe -d /host`), from the host's, which
        holds the build that was loaded before any swap. Returns what it loaded."""
        name = canon(name)
        if name in self.st.modules:
            return []
        if not self.installed(name, host_tree):
            raise KernelError(errno.ENOENT, f"Module {name} not found in directory "
                              f"/lib/modules/{self.sc.kernel}")
        if use_blacklist and name in self.blacklisted():
            return []
        if name == "nvidia_peermem":
            return self._load_peermem()
        version = self.sc.loaded_version if host_tree else self.sc.installed_version
        srcversion = self.sc.host_srcversion if host_tree else self.sc.installed_srcversion
        loaded: list[str] = []
        for dep in self.catalog_deps(name, version):
            loaded += self.load_module(dep, host_tree=host_tree)
        for dep in self.catalog_deps(name, version):
            have = self.st.modules[dep]
            if dep in STACK_DEPS and have.srcversion != srcversion(dep):
                raise KernelError(errno.EINVAL, f"could not insert '{name}': Invalid argument "
                                  f"({name} disagrees about version of symbols of {dep})")
        self._insert(name, version, srcversion(name), list(self.catalog_deps(name, version)))
        self._modules_changed()
        if name == "mlx5_core":  # the driver probes the PFs it finds: their netdevs come back
            self._bring_up_pfs()
        return [*loaded, name]

    def peermem_error(self: SimKernel) -> tuple[KernelError, str] | None:
        """Why `modprobe nvidia-peermem` would fail now: (the error modprobe reports, the kernel
        log's reason), or None. Judged from the `.ko` on disk against the live stack."""
        ko = find_peermem_ko(self.root, self.sc.kernel)
        if ko is None:
            return KernelError(errno.ENOENT, "Module nvidia_peermem not found in directory "
                               f"/lib/modules/{self.sc.kernel}"), "no nvidia-peermem.ko installed"
        insert = "could not insert 'nvidia_peermem': "
        fields = dict(line.split("=", 1) for line in ko.read_text().splitlines() if "=" in line)
        if not fields.get("vermagic", "").startswith(self.sc.kernel + " "):
            return (KernelError(errno.ENOEXEC, insert + "Exec format error"),
                    f"version magic '{fields.get('vermagic')}' should be '{self.sc.kernel} ...'")
        crcs = read_modversions(ko)
        if not any(s in crcs for s in PEER_SYMBOLS):
            return (KernelError(errno.EINVAL, insert + "Invalid argument"),
                    "init returned -22 (a stub: built without the ofa_kernel headers)")
        core = self.st.modules.get("ib_core")
        exporter = peer_exporter(core.version) if core else None
        if not exporter or exporter not in self.st.modules:
            return (KernelError(errno.ENOENT, insert + "Unknown symbol in module, or unknown "
                                "parameter (see dmesg)"),
                    f"Unknown symbol {PEER_SYMBOLS[0]} (err -2)")
        have = self.st.modules[exporter].version
        for sym in PEER_SYMBOLS:
            if crcs.get(sym) != peer_crc(have, sym):
                return (KernelError(errno.EINVAL, insert + "Invalid argument"),
                        f"disagrees about version of symbol {sym}")
        return None

    def _load_peermem(self: SimKernel) -> list[str]:
        failure = self.peermem_error()
        if failure is not None:
            err, why = failure
            self.note("peermem.load_failed", errno=errno.errorcode.get(err.errno or 0, err.errno),
                      dmesg=why)
            raise err
        core = self.st.modules["ib_core"]
        uses = sorted({"ib_core", peer_exporter(core.version) or "ib_core"})
        self._insert("nvidia_peermem", "nvidia", "PEERMEM" + core.srcversion[:16], uses)
        self.st.peermem_loads += 1
        self._modules_changed()
        return ["nvidia_peermem"]

    def peermem_info(self: SimKernel) -> dict[str, Any]:
        """What the simulator knows about nvidia-peermem: loads so far, loaded now, and whether a
        load would fail now (and why)."""
        failure = self.peermem_error() if "nvidia_peermem" not in self.st.modules else None
        return {"loads": self.st.peermem_loads, "loaded": "nvidia_peermem" in self.st.modules,
                "load_error": None if failure is None else {
                    "errno": errno.errorcode.get(failure[0].errno or 0, failure[0].errno),
                    "error": failure[0].strerror, "dmesg": failure[1]}}

    def unload_module(self: SimKernel, name: str) -> None:
        """`rmmod NAME`: refuses while any module or user holds it."""
        name = canon(name)
        if name not in self.st.modules:
            raise KernelError(errno.ENOENT, f"Module {name} is not currently loaded")
        holders = self.st.holders(name)
        if holders or self.st.modules[name].users:
            by = ",".join(holders) or f"{self.st.modules[name].users} user(s)"
            raise KernelError(errno.EBUSY, f"Module {name} is in use by: {by}")
        if name == "mlx5_core":
            for pf in self.st.pfs.values():
                self.remove_vfs(pf)
                self._remove_netdev(pf.netdev)
                pf.netdev = None
                pf.bind_seq += 1
        del self.st.modules[name]
        self.note("module.unloaded", module=name)
        self._modules_changed()

    def remove_module(self: SimKernel, name: str) -> list[str]:
        """`modprobe -r NAME`: unload it, then its dependencies that nothing uses any more."""
        name = canon(name)
        if name not in self.st.modules:
            raise KernelError(errno.ENOENT, f"Module {name} is not in kernel.")
        deps = list(self.st.modules[name].uses)
        self.unload_module(name)
        removed = [name]
        for dep in deps:
            if (dep in self.st.modules and not self.st.holders(dep)
                    and not self.st.modules[dep].users):
                removed += self.remove_module(dep)
        return removed

    def _modules_changed(self: SimKernel) -> None:
        core = self.st.modules.get("mlx5_core")
        self.st.loaded_version = core.version if core is not None else ""
        self.tree.modules(self.st)
        self.dirty = True

    # ---- openibd ------------------------------------------------------------------------------
    def openibd_stop(self: SimKernel) -> dict[str, Any]:
        """The first half of `openibd restart`: refuse, or take every netdev and the stack away."""
        self.st.openibd_restarts += 1
        if self.st.openibd_restarts <= self.sc.openibd_failures:
            raise KernelError(errno.EBUSY, "ERROR: Module mlx5_core is in use (scenario: "
                              f"restart {self.st.openibd_restarts} of the first "
                              f"{self.sc.openibd_failures} fails)")
        stack = [m for m in STACK_DEPS if m in self.st.modules]
        for mod in self.st.modules.values():
            if mod.name in STACK_DEPS:
                continue
            held = [u for u in mod.uses if u in stack]
            if held:
                raise KernelError(errno.EBUSY, f"ERROR: Module {held[0]} is in use by {mod.name}")
        for pf in self.st.pfs.values():
            self.remove_vfs(pf)
            self._remove_netdev(pf.netdev)
            pf.netdev, pf.eswitch = None, "legacy"
            pf.bind_seq += 1
        for m in stack:
            del self.st.modules[m]
        self.note("openibd.unloaded", modules=stack)
        self._modules_changed()
        self.schedule(min(1.0, self.sc.openibd_restart_s / 10), {"kind": "alias_autoload"})
        return {"duration_s": self.sc.scaled(self.sc.openibd_restart_s)}

    def _ev_alias_autoload(self: SimKernel) -> None:
        """The host's udev sees mlx5 PCI functions without a driver and runs `modprobe -b ALIAS`."""
        if "mlx5_core" in self.st.modules or "mlx5_core" in self.blacklisted(by_udev=True):
            if "mlx5_core" not in self.st.modules:
                self.note("udev.alias_blacklisted", module="mlx5_core")
            return
        version = self.sc.loaded_version
        for m in ("mlx_compat", "mlxfw", "mlx5_core"):
            if m in stack_modules(version) and m not in self.st.modules:
                self._insert(m, version, self.sc.host_srcversion(m), list(deps_for(version, m)))
        self.note("udev.alias_autoload", module="mlx5_core", version=version)
        self._modules_changed()
        self._bring_up_pfs()

    def openibd_start(self: SimKernel, alt: bool = False) -> dict[str, Any]:
        """The second half: load the installed stack (`alt`: the host's), bring the PFs back."""
        version = self.sc.loaded_version if alt else self.sc.installed_version
        srcversion = self.sc.host_srcversion if alt else self.sc.installed_srcversion
        if not alt and not self.installed("mlx5_core"):
            raise KernelError(errno.ENOENT, "FATAL: Module mlx5_core not found in directory "
                              f"/lib/modules/{self.sc.kernel} (the driver's packages are not "
                              "installed)")
        for m in sorted(stack_modules(version), key=lambda m: m != "mlx5_core"):
            have = self.st.modules.get(m)
            if have and have.srcversion != srcversion(m):
                raise KernelError(errno.EBUSY, f"ERROR: Module {m} is in use (a {have.version} "
                                  f"{m} was loaded by the host while openibd had it unloaded)")
        for m in stack_modules(version):
            if m not in self.st.modules:
                self._insert(m, version, srcversion(m), list(deps_for(version, m)))
        self.note("openibd.loaded", version=version)
        self._modules_changed()
        self._bring_up_pfs()
        return {"version": version}

    def _bring_up_pfs(self: SimKernel) -> None:
        for pf in self.st.pfs.values():
            if pf.netdev is None:
                pf.bind_seq += 1
                self.schedule(self.sc.netdev_delay_s(pf.pci, None),
                              {"kind": "netdev_appear", "pci": pf.pci, "bind_seq": pf.bind_seq})

    def lsmod_rows(self: SimKernel) -> list[tuple[str, int, list[str]]]:
        return [(m, self.st.refcnt(m), self.st.holders(m)) for m in sorted(self.st.modules)]


__all__ = ["INBOX", "KernelError", "ModulesMixin", "canon"]
