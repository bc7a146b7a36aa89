"""What the peermem loader decides, as pure functions: the pre-checks and the failure classes.

`evaluate(facts)` turns what was read from the node (`gather.py`) into one `Verdict`: load now,
already loaded and verified, wait (the NIC side is not ready: retry when something changes), or
rebuild needed (this nvidia-peermem.ko can never load against this stack: say so loudly, keep
watching for a new build). `classify_failure` does the same for a `modprobe nvidia-peermem` that
failed (field notes §5): ENOENT "Unknown symbol" -> wait; EINVAL (a stub, or a modversions CRC
mismatch) and ENOEXEC (vermagic) -> rebuild; a timeout -> wait (a module still initialising).
No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

MODULE = "nvidia_peermem"
MODPROBE_NAME = "nvidia-peermem"
PEER_SYMBOLS = ("ib_register_peer_memory_client", "ib_unregister_peer_memory_client")
STACK = ("mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs")  # live before nvidia-peermem can load

REBUILD_NEXT = ("rebuild nvidia-peermem against the NIC driver that is loaded now: restart the GPU "
                "driver pod (or rerun its build) once the NIC driver is ready, with the NIC "
                "driver's headers visible (/run/mellanox/drivers/usr/src/ofa_kernel: "
                "MLX_DRIVERS_MOUNT + SHARED_KERNEL_HEADERS_DIR); the loader keeps watching and "
                "loads the new build when it appears")


class Kind(StrEnum):
    LOAD = "load"  # every pre-check passed: run modprobe
    LOADED = "loaded"  # modprobe succeeded (this run loaded it)
    VERIFIED = "verified"  # it was already loaded, against the stack the marker promises
    WAIT = "wait"  # the NIC side is not ready: retry when something changes
    REBUILD = "rebuild"  # this .ko cannot load against this stack: a new build is needed
    ERROR = "error"  # anything else: retried with a backoff


DEFINITIVE = frozenset({"enoent", "einval", "enoexec", "ko-missing"})
STATUS = {Kind.LOAD: "waiting", Kind.LOADED: "loaded", Kind.VERIFIED: "loaded",
          Kind.WAIT: "waiting", Kind.REBUILD: "rebuild-needed", Kind.ERROR: "waiting"}


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    code: str  # short and stable: marker-absent, stub, crc-mismatch, enoent... (metrics label)
    reason: str  # one line naming what is missing or wrong
    next: str = ""  # what to do about it (nothing: it resolves itself)

    @property
    def status(self) -> str:
        """The contract's words: loaded | waiting | rebuild-needed."""
        return STATUS[self.kind]

    @property
    def ok(self) -> bool:
        return self.kind in (Kind.LOADED, Kind.VERIFIED)

    @property
    def definitive(self) -> bool:
        """The kernel's final answer for these inputs: retry only once one of them changed."""
        return self.code in DEFINITIVE


@dataclass(frozen=True)
class Marker:
    """The NIC readiness marker: its identity (a rewrite is a new one) and what it promises."""

    mtime_ns: int
    inode: int
    srcversions: Mapping[str, str] | None  # None: a legacy (empty, non-JSON) marker
    driver_version: str | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.mtime_ns, self.inode)

    def newer_than(self, key: tuple[int, int] | None) -> bool:
        """Written after the marker `key` identifies (None: nothing to be newer than). A marker
        put back with its old time (a copy, a restored file) is not newer."""
        return key is None or self.mtime_ns > key[0]


@dataclass(frozen=True)
class KoFacts:
    """The nvidia-peermem.ko modprobe would load: `modinfo` and `modprobe --dump-modversions`."""

    filename: str | None  # None: not installed (modinfo failed)
    vermagic: str | None = None
    modversions: Mapping[str, str] | None = None  # symbol -> CRC; None: could not be read
    error: str | None = None  # why a field is missing


@dataclass(frozen=True)
class Facts:
    """Everything the pre-checks look at, read from the node (read-only)."""

    marker: Marker | None
    loaded_against: tuple[int, int] | None = None  # the marker of our last load/verification
    blacklist: str | None = None  # the OFED blacklist file, when present on the host
    srcversions: Mapping[str, str | None] = field(default_factory=dict)  # first reading
    srcversions_later: Mapping[str, str | None] | None = None  # after the debounce
    exporters: Mapping[str, str] = field(default_factory=dict)  # peer symbol -> [module]
    peermem_loaded: bool = False
    kernel_release: str = ""
    ko: KoFacts | None = None
    symvers: Mapping[str, str] | None = None  # peer symbol -> CRC in the mounted Module.symvers
    symvers_path: str | None = None
    gpu_required: bool = False
    gpu_marker: bool = False
    nvidia_loaded: bool = False


def _wait(code: str, reason: str, next_step: str = "") -> Verdict:
    return Verdict(Kind.WAIT, code, reason, next_step)


def _rebuild(code: str, reason: str) -> Verdict:
    return Verdict(Kind.REBUILD, code, reason, REBUILD_NEXT)


def evaluate_stack(f: Facts) -> Verdict | None:
    """The checks on the NIC side (marker, blacklist, modules, srcversions, symbols): a WAIT
    verdict, or None when they all pass."""
    if f.gpu_required and not (f.gpu_marker and f.nvidia_loaded):
        missing = [w for w, ok in (("the GPU driver's readiness marker", f.gpu_marker),
                                   ("the nvidia module", f.nvidia_loaded)) if not ok]
        return _wait("gpu-not-ready", "the GPU driver is not ready: " + " and ".join(missing)
                     + " missing", "the GPU driver container loads nvidia and sets its marker")
    if f.marker is None:
        return _wait("marker-absent", "the NIC driver's readiness marker is absent",
                     "the NIC driver container (mofed-lifecycle run) sets it once the installed "
                     "driver is loaded and its VFs restored")
    if not f.peermem_loaded and not f.marker.newer_than(f.loaded_against):
        return _wait("marker-not-newer", "nvidia_peermem is gone but the NIC readiness marker is "
                     "the one it was last loaded against: a NIC driver reload is under way",
                     "waiting for the NIC driver container to set a new marker")
    if f.blacklist:
        return _wait("blacklist", f"the OFED blacklist file {f.blacklist} is on the host: a NIC "
                     "driver reload is in progress", "it is removed when the reload ends")
    missing = [m for m in STACK if not f.srcversions.get(m)]
    if missing:
        return _wait("module-missing", f"not loaded: {', '.join(missing)}",
                     "the NIC driver stack is not (fully) loaded yet")
    promised = f.marker.srcversions or {}
    wrong = [f"{m} {f.srcversions.get(m)} ≠ marker {want}" for m, want in sorted(promised.items())
             if m in f.srcversions and f.srcversions.get(m) != want]
    if wrong:
        return _wait("srcversion-mismatch", "the loaded NIC driver is not the one the readiness "
                     "marker promises: " + "; ".join(wrong),
                     "a stale marker, or a reload since: waiting for a new marker")
    if f.srcversions_later is not None and dict(f.srcversions_later) != dict(f.srcversions):
        changed = sorted(m for m in STACK if f.srcversions_later.get(m) != f.srcversions.get(m))
        return _wait("unstable", f"srcversions changed within the debounce: {', '.join(changed)}",
                     "modules are being swapped (a reload?)")
    absent = [s for s in PEER_SYMBOLS if s not in f.exporters]
    if absent:
        return _wait("symbols-absent", f"the peer-memory API ({', '.join(absent)}) is not in "
                     "/proc/kallsyms: the loaded stack is the inbox one or half loaded")
    return None


def check_ko(f: Facts) -> Verdict | None:
    """The checks on nvidia-peermem.ko itself: WAIT (not installed), REBUILD, or None."""
    ko = f.ko
    if ko is None or ko.filename is None:
        why = f" ({ko.error})" if ko and ko.error else ""
        return _wait("ko-missing", f"nvidia-peermem.ko is not installed for kernel "
                     f"{f.kernel_release}{why}", "the GPU driver container builds and installs it")
    if ko.vermagic is not None and not (ko.vermagic + " ").startswith(f.kernel_release + " "):
        return _rebuild("vermagic", f"{ko.filename} was built for kernel "
                        f"{ko.vermagic.split()[0] if ko.vermagic.split() else '?'}, the running "
                        f"kernel is {f.kernel_release} (modprobe would fail ENOEXEC)")
    if ko.modversions is None:
        return Verdict(Kind.ERROR, "modversions-unreadable", f"cannot read the modversions of "
                       f"{ko.filename}: {ko.error or 'modprobe --dump-modversions failed'}")
    if not any(s in ko.modversions for s in PEER_SYMBOLS):
        return _rebuild("stub", f"{ko.filename} imports no peer-memory symbol: a stub, built when "
                        "the NIC driver's ofa_kernel headers were not visible (its init returns "
                        "EINVAL)")
    if f.symvers is not None:
        bad = [f"{s} {ko.modversions.get(s)} ≠ {f.symvers.get(s)}" for s in PEER_SYMBOLS
               if s in f.symvers and ko.modversions.get(s) != f.symvers[s]]
        if bad:
            return _rebuild("crc-mismatch", f"{ko.filename} was built against another NIC driver "
                            f"build: modversions CRC vs {f.symvers_path}: " + "; ".join(bad)
                            + " (modprobe would fail EINVAL, 'disagrees about version of symbol')")
    return None


def evaluate(f: Facts) -> Verdict:
    """All pre-checks in order; LOAD only when every one passed."""
    stack = evaluate_stack(f)
    if stack is not None:
        return stack
    exporter = f.exporters.get(PEER_SYMBOLS[0], "?")
    if f.peermem_loaded:
        return Verdict(Kind.VERIFIED, "verified", f"nvidia_peermem is loaded and the peer-memory "
                       f"API it uses is exported by the live {exporter}")
    ko = check_ko(f)
    if ko is not None:
        return ko
    note = "" if f.symvers is not None else " (no Module.symvers to compare CRCs with)"
    return Verdict(Kind.LOAD, "load", f"the NIC driver is ready (peer-memory API from {exporter})"
                   + note)


def fingerprint(f: Facts) -> tuple[object, ...]:
    """What a failed load depended on: a retry is worth it only once one of these changed."""
    ko = f.ko
    return (f.marker.key if f.marker else None, tuple(sorted(f.srcversions.items())),
            tuple(sorted(f.exporters.items())),
            None if ko is None else (ko.filename, ko.vermagic,
                                     tuple(sorted((ko.modversions or {}).items()))))


def classify_failure(returncode: int | None, stderr: str, *, timed_out: bool = False,
                     timeout_s: float = 0.0) -> Verdict:
    """A failed `modprobe nvidia-peermem`, from what it printed (the kernel's errno in words)."""
    text = " ".join(stderr.split())
    low = text.lower()
    if timed_out:
        return _wait("timeout", f"modprobe nvidia-peermem did not finish within {timeout_s:g}s "
                     "(killed): a module still initialising?", "retried when something changes")
    if "unknown symbol" in low:
        return _wait("enoent", f"ENOENT, Unknown symbol: the peer-memory API is not live (inbox "
                     f"or half-loaded NIC stack): {text}")
    if "invalid argument" in low or "disagrees about version" in low:
        return _rebuild("einval", f"EINVAL: nvidia-peermem.ko is a stub or was built against "
                        f"another NIC driver build (modversions CRC mismatch): {text}")
    if "exec format error" in low:
        return _rebuild("enoexec", f"ENOEXEC: nvidia-peermem.ko was built for another kernel "
                        f"(vermagic): {text}")
    if "not found" in low:
        return _wait("ko-missing", f"nvidia-peermem.ko is not installed: {text}",
                     "the GPU driver container builds and installs it")
    return Verdict(Kind.ERROR, "modprobe-failed", f"modprobe nvidia-peermem failed (exit "
                   f"{returncode}): {text or '(no output)'}", "see dmesg; retried with a backoff")


def parse_kallsyms(text: str) -> dict[str, str]:
    """Peer symbol -> the module that exports it (`[module]` tag; "vmlinux" when built in)."""
    out: dict[str, str] = {}
    for sym in PEER_SYMBOLS:
        at = text.find(f" {sym}")
        while at >= 0:
            end = text.find("\n", at)
            line = text[at + 1:end if end >= 0 else len(text)]
            name, _, rest = line.partition("\t")
            if name.strip() == sym:
                out[sym] = rest.strip().strip("[]") or "vmlinux"
                break
            at = text.find(f" {sym}", at + 1)
    return out


def parse_modversions(text: str) -> dict[str, str]:
    """`modprobe --dump-modversions` lines: `0x1234abcd<TAB>symbol`."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("0x"):
            out[parts[1]] = f"0x{int(parts[0], 16):08x}"
    return out


def parse_symvers(text: str) -> dict[str, str]:
    """Module.symvers lines `CRC<TAB>symbol<TAB>module<TAB>export...`: the peer symbols' CRCs."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in PEER_SYMBOLS:
            out[parts[1]] = f"0x{int(parts[0], 16):08x}"
    return out
