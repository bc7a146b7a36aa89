"""Renders the simulated kernel's state as files under the node root: sysfs, /proc, modules on disk.

The daemon reads these like the real ones (`/sys/module/<m>/srcversion`, `/proc/modules`,
`/sys/class/net/<if>/type`, `/sys/bus/pci/devices/<pci>/virtfnN` ...). Each function renders one
object and is idempotent, so the kernel can update exactly what changed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from pathlib import Path

from .model import KernelState, Netdev, Pf, Vf, is_vendor
from .peermem_ko import render_peermem_files
from .scenario import AUX_DEPS, PEER_SYMBOLS, STACK_DEPS, Scenario, deps_for, peer_exporter
from .tree_host import render_host

PCI_PARENT = "devices/pci0000:00"
DEVICE_ID = {"pf": "0x101d", "vf": "0x101e"}  # ConnectX-6 Dx PF / VF


def _write(path: Path | str, text: str) -> None:
    """Write a small attribute file, creating its directory on first use (hot path: os calls)."""
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _link(path: Path | str, target: str) -> None:
    try:
        os.symlink(target, path)
    except FileExistsError:
        if os.path.islink(path) and os.readlink(path) == target:
            return
        os.unlink(path)
        os.symlink(target, path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)


def _unlink(path: Path | str) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def installed_modules(sc: Scenario) -> list[str]:
    """The modules the driver's packages install (and the host's tree holds copies of)."""
    return [*STACK_DEPS, *AUX_DEPS, *(n for n, _ in sc.extra_modules)]


def ko_text(kernel: str, rel: str, name: str, version: str, srcversion: str,
            deps: tuple[str, ...]) -> str:
    """A simulated `.ko` at /lib/modules/<kernel>/<rel>: what modinfo and modprobe read."""
    lines = [
        "# simulated kernel module: read by the simulated modinfo/modprobe",
        f"name={name}",
        f"filename=/lib/modules/{kernel}/{rel}",
        f"depends={','.join(deps)}",
        f"vermagic={kernel} SMP preempt mod_unload modversions",
    ]
    if srcversion:  # an unversioned build: `modinfo -F srcversion` prints nothing
        lines.append(f"srcversion={srcversion}")
    if version != "inbox":
        lines.append(f"version={version}")
    return "\n".join(lines) + "\n"


def driver_module_files(sc: Scenario) -> dict[str, str]:
    """Node path -> content of every file the installed driver puts under /lib/modules (its
    modules in updates/, and modules.dep): what `sim init` renders for a precompiled image, and
    what the built packages install."""
    base = f"/lib/modules/{sc.kernel}"
    out: dict[str, str] = {}
    dep_lines = []
    for m in installed_modules(sc):
        deps = deps_for(sc.installed_version, m)
        rel = f"updates/{m}.ko"
        out[f"{base}/{rel}"] = ko_text(sc.kernel, rel, m, sc.installed_version,
                                       sc.installed_srcversion(m), deps)
        dep_lines.append(f"{rel}: " + " ".join(f"updates/{d}.ko" for d in deps))
    out[f"{base}/modules.dep"] = "\n".join(dep_lines) + "\n"
    return out


class Tree:
    """The files of one simulated node."""

    def __init__(self, root: Path, sc: Scenario) -> None:
        self.root, self.sc = root, sc
        self.sys = root / "sys"

    def dev_dir(self, pci: str) -> Path:
        return self.sys / PCI_PARENT / pci

    # ---- static parts ----------------------------------------------------------------------
    def render_static(self) -> None:
        """Directories and files that do not change while the node lives."""
        for d in ("sys/class/net", "sys/bus/pci/devices", "sys/module", "run/mellanox/drivers",
                  "etc/modprobe.d", "etc/init.d", "proc/sys/kernel", "dev", "host",
                  "run/nvidia/validations"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for name in ("etc", "lib", "usr"):
            _link(self.root / "host" / name, f"../{name}")
        (self.root / "usr/src").mkdir(parents=True, exist_ok=True)
        _write(self.root / "proc/sys/kernel/osrelease", self.sc.kernel + "\n")
        _write(self.root / "proc/version", f"Linux version {self.sc.kernel} (simulated)\n")
        _write(self.sys / "bus/pci/drivers_probe", "")
        self.driver_dir("vfio-pci", present=True)
        self.render_module_files()
        render_peermem_files(self.root, self.sc)  # nvidia-peermem.ko, the driver's Module.symvers
        render_host(self.root, self.sc, PCI_PARENT)  # [host]: IOMMU mode, GPUs

    def render_module_files(self) -> None:
        """The installed (container) modules under updates/ and the host's copies under kernel/.
        Where the driver is built on the node ([build] sources, dtk), updates/ is empty until
        its packages are installed (sim/build.py writes them then)."""
        sc = self.sc
        mods = self.root / "lib/modules" / sc.kernel
        for m in installed_modules(sc):
            self._ko(mods / f"kernel/{m}.ko", m, sc.loaded_version, sc.host_srcversion(m),
                     deps_for(sc.loaded_version, m))
        if sc.build.builds:
            _write(mods / "modules.dep", "")
            return
        for rel, text in driver_module_files(sc).items():
            _write(self.root / rel.lstrip("/"), text)

    def _ko(self, path: Path, name: str, version: str, srcversion: str,
            deps: tuple[str, ...]) -> None:
        _write(path, ko_text(self.sc.kernel, f"{path.parent.name}/{path.name}", name, version,
                             srcversion, deps))

    def firmware(self, st: KernelState) -> None:
        """`.sim/fw.json`: each PF's firmware configuration, for the stand-in mstconfig."""
        _write(self.root / ".sim/fw.json", json.dumps({p.pci: p.fw for p in st.pfs.values()}))

    def route(self, st: KernelState) -> None:
        """/proc/net/route (the default route through `st.default_route` and the prefix route of
        each IPv4 address) and /proc/net/if_inet6 (the IPv6 addresses), as the kernel lists them."""
        rows = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\t"
                "Window\tIRTT"]
        if st.default_route:
            rows.append(f"{st.default_route}\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0"
                        "\t0\t0")
        inet6 = []
        for nd in st.netdevs.values():
            for cidr in nd.addresses:
                iface = ipaddress.ip_interface(cidr)
                if iface.version == 4:
                    net = iface.network
                    rows.append(f"{nd.name}\t{net.network_address.packed[::-1].hex().upper()}\t"
                                f"00000000\t0001\t0\t0\t0\t"
                                f"{net.netmask.packed[::-1].hex().upper()}\t0\t0\t0")
                else:
                    inet6.append(f"{iface.ip.exploded.replace(':', '')} {nd.ifindex:02x} "
                                 f"{iface.network.prefixlen:02x} 00 80 {nd.name:>8}")
        _write(self.root / "proc/net/route", "\n".join(rows) + "\n")
        _write(self.root / "proc/net/if_inet6", "".join(x + "\n" for x in inet6))

    def render_all(self, st: KernelState) -> None:
        """Everything, from scratch: used at init and to repair after a crash mid-update."""
        for d in ("sys/devices", "sys/class/net", "sys/bus/pci/devices", "sys/module"):
            _unlink(self.root / d)
        self.render_static()
        self.modules(st)
        for pf in st.pfs.values():
            self.function(st, pf, None)
            for vf in pf.vfs:
                self.function(st, pf, vf)
        for nd in st.netdevs.values():
            self.netdev(nd)
        for pf in st.pfs.values():
            self.eswitch(st, pf)
        self.route(st)
        self.firmware(st)

    # ---- modules ---------------------------------------------------------------------------
    def modules(self, st: KernelState) -> None:
        """/sys/module/*, /proc/modules, /proc/kallsyms and the driver directories."""
        present = set()
        for m in st.modules.values():
            present.add(m.name)
            d = self.sys / "module" / m.name
            if m.srcversion:  # an unversioned (inbox) build has no srcversion file
                _write(d / "srcversion", m.srcversion + "\n")
            else:
                (d / "srcversion").unlink(missing_ok=True)
            _write(d / "refcnt", f"{st.refcnt(m.name)}\n")
            _write(d / "initstate", "live\n")
            if is_vendor(m.version) and m.version != "nvidia":
                _write(d / "version", m.version + "\n")
            holders = d / "holders"
            holders.mkdir(exist_ok=True)
            want = set(st.holders(m.name))
            for h in os.listdir(holders):
                if h not in want:
                    (holders / h).unlink()
            for h in want:
                _link(holders / h, f"../../{h}")
        for name in os.listdir(self.sys / "module"):
            if name not in present:
                _unlink(self.sys / "module" / name)
        lines = []
        for i, m in enumerate(sorted(st.modules.values(), key=lambda m: m.name)):
            used_by = "".join(h + "," for h in st.holders(m.name)) or "-"
            addr = 0xFFFFFFFFC0A00000 + i * 0x40000
            size = 65536 + 4096 * i
            lines.append(f"{m.name} {size} {st.refcnt(m.name)} {used_by} Live 0x{addr:x}")
        _write(self.root / "proc/modules", "\n".join(lines) + ("\n" if lines else ""))
        self.kallsyms(st)
        self.driver_dir("mlx5_core", present="mlx5_core" in st.modules)
        for pf in st.pfs.values():
            if os.path.isdir(self.dev_dir(pf.pci)):
                self.binding(st, pf, None)
                self.sriov(pf, bound="mlx5_core" in st.modules)

    def kallsyms(self, st: KernelState) -> None:
        lines = ["ffffffff81000000 T _stext", "ffffffff81001000 T printk"]
        if "ib_core" in st.modules:
            lines.append("ffffffffc0a10000 T ib_register_client\t[ib_core]")
        exporter = peer_exporter(st.modules["ib_core"].version) if "ib_core" in st.modules else None
        if exporter and exporter in st.modules and is_vendor(st.modules[exporter].version):
            for i, sym in enumerate(PEER_SYMBOLS):
                lines.append(f"ffffffffc0b2{i:04x} T {sym}\t[{exporter}]")
        _write(self.root / "proc/kallsyms", "\n".join(lines) + "\n")

    def driver_dir(self, driver: str, *, present: bool) -> None:
        d = self.sys / "bus/pci/drivers" / driver
        if not present:
            _unlink(d)
            return
        for attr in ("bind", "unbind", "new_id", "remove_id"):
            if not (d / attr).exists():
                _write(d / attr, "")

    # ---- PCI functions ---------------------------------------------------------------------
    def function(self, st: KernelState, pf: Pf, vf: Vf | None) -> None:
        """One PCI function's directory: ids, SR-IOV attributes, driver and physfn links."""
        pci = vf.pci if vf else pf.pci
        d = f"{self.sys}/{PCI_PARENT}/{pci}"
        kind = "vf" if vf else "pf"
        _write(f"{d}/vendor", "0x15b3\n")
        _write(f"{d}/device", DEVICE_ID[kind] + "\n")
        _write(f"{d}/class", "0x020000\n" if pf.link == "eth" else "0x020700\n")
        _link(f"{d}/subsystem", "../../../bus/pci")
        _link(f"{self.sys}/bus/pci/devices/{pci}", f"../../../{PCI_PARENT}/{pci}")
        if vf:
            _link(f"{d}/physfn", f"../{pf.pci}")
        self.binding(st, pf, vf)
        if not vf:
            self.sriov(pf, bound="mlx5_core" in st.modules)

    def binding(self, st: KernelState, pf: Pf, vf: Vf | None) -> None:
        """What changes on bind/unbind: the driver links, driver_override and the uevent file."""
        pci = vf.pci if vf else pf.pci
        d = f"{self.sys}/{PCI_PARENT}/{pci}"
        kind = "vf" if vf else "pf"
        driver = vf.driver if vf else ("mlx5_core" if "mlx5_core" in st.modules else None)
        _write(f"{d}/driver_override", ((vf.driver_override if vf else "") or "(null)") + "\n")
        dev_id = DEVICE_ID[kind][2:].upper()
        ev = [f"PCI_SLOT_NAME={pci}", f"PCI_ID=15B3:{dev_id}",
              f"MODALIAS=pci:v000015B3d0000{dev_id}sv*sd*bc02sc00i00"]
        drv_dir = f"{self.sys}/bus/pci/drivers"
        for other in ("mlx5_core", "vfio-pci"):
            if other != driver:
                _unlink(f"{drv_dir}/{other}/{pci}")
        if driver:
            ev.insert(0, f"DRIVER={driver}")
            _link(f"{d}/driver", f"../../../bus/pci/drivers/{driver}")
            _link(f"{drv_dir}/{driver}/{pci}", f"../../../../{PCI_PARENT}/{pci}")
        else:
            _unlink(f"{d}/driver")
        _write(f"{d}/uevent", "\n".join(ev) + "\n")

    def sriov(self, pf: Pf, *, bound: bool) -> None:
        """A PF's SR-IOV attributes and its virtfnN links."""
        d = f"{self.sys}/{PCI_PARENT}/{pf.pci}"
        _write(f"{d}/sriov_totalvfs", f"{pf.totalvfs}\n")
        _write(f"{d}/sriov_numvfs", f"{len(pf.vfs) if bound else 0}\n")
        _write(f"{d}/sriov_drivers_autoprobe", f"{int(pf.autoprobe)}\n")
        _write(f"{d}/sriov_offset", f"{pf.vf_offset}\n")
        _write(f"{d}/sriov_stride", "1\n")
        _write(f"{d}/sriov_vf_device", DEVICE_ID["vf"][2:] + "\n")
        have = {v.index for v in pf.vfs}
        for entry in os.listdir(d):
            if entry.startswith("virtfn") and int(entry[6:]) not in have:
                os.unlink(f"{d}/{entry}")
        for v in pf.vfs:
            _link(f"{d}/virtfn{v.index}", f"../{v.pci}")

    def drop_function(self, pci: str) -> None:
        for drv in ("mlx5_core", "vfio-pci"):
            _unlink(self.sys / "bus/pci/drivers" / drv / pci)
        _unlink(self.sys / "bus/pci/devices" / pci)
        _unlink(self.dev_dir(pci))

    # ---- netdevs ---------------------------------------------------------------------------
    def netdev_dir(self, nd: Netdev) -> Path:
        return self.dev_dir(nd.pci) / "net" / nd.name

    def netdev(self, nd: Netdev) -> None:
        d = f"{self.sys}/{PCI_PARENT}/{nd.pci}/net/{nd.name}"
        _write(f"{d}/ifindex", f"{nd.ifindex}\n")
        _write(f"{d}/type", f"{nd.link_type}\n")
        _write(f"{d}/addr_len", f"{len(nd.address.split(':'))}\n")
        _write(f"{d}/uevent", f"INTERFACE={nd.name}\nIFINDEX={nd.ifindex}\n")
        _link(f"{d}/subsystem", "../../../../../class/net")
        _link(f"{d}/device", "../../../" + nd.pci)
        _link(f"{self.sys}/class/net/{nd.name}", f"../../{PCI_PARENT}/{nd.pci}/net/{nd.name}")
        if nd.port_name:
            _write(f"{d}/phys_port_name", nd.port_name + "\n")
        self.netdev_state(nd)

    def eswitch(self, st: KernelState, pf: Pf) -> None:
        """MOFED's compat view of the devlink eswitch mode, on the PF's uplink netdev."""
        nd = st.netdevs.get(pf.netdev) if pf.netdev is not None else None
        if nd is not None and pf.link == "eth":
            _write(self.netdev_dir(nd) / "compat" / "devlink" / "mode", pf.eswitch + "\n")

    def netdev_state(self, nd: Netdev) -> None:
        """What `ip link set` changes: MTU, address, admin state."""
        d = f"{self.sys}/{PCI_PARENT}/{nd.pci}/net/{nd.name}"
        _write(f"{d}/mtu", f"{nd.mtu}\n")
        _write(f"{d}/address", nd.address + "\n")
        _write(f"{d}/flags", "0x1003\n" if nd.up else "0x1002\n")
        _write(f"{d}/operstate", "up\n" if nd.up else "down\n")

    def drop_netdev(self, nd: Netdev) -> None:
        _unlink(self.sys / "class/net" / nd.name)
        _unlink(self.netdev_dir(nd))

    def rename_netdev(self, nd: Netdev, old: str) -> None:
        base = self.dev_dir(nd.pci) / "net"
        _unlink(self.sys / "class/net" / old)
        if (base / old).exists():
            os.replace(base / old, base / nd.name)
        _write(base / nd.name / "uevent", f"INTERFACE={nd.name}\nIFINDEX={nd.ifindex}\n")
        _link(f"{self.sys}/class/net/{nd.name}", f"../../{PCI_PARENT}/{nd.pci}/net/{nd.name}")
