"""The reload decision: is the driver stack that is loaded the one that is installed? Pure, no I/O.

Every module of the driver stack that is loaded or installed is compared: its loaded srcversion
(`/sys/module/<m>/srcversion`, and whether it is in `/proc/modules` at all) against the installed
one (`modinfo -F srcversion <m>`). The rules, each a promise to the node:
- the core (mlx5_core, mlx5_ib, ib_core) must be loaded and equal to the installed build;
- a module absent on both sides is no difference;
- a module installed but not loaded (ib_ipoib, rpcrdma, nvme_rdma...) is no reason to reload: the
  reload would not change that; it is listed in `to_load` (loaded after a swap, or reported);
- a loaded module without a srcversion is an unversioned (inbox) build: it cannot be compared, so
  it reloads, and the explanation says exactly that;
- a loaded module whose srcversion differs from the installed one, or that is not installed at all
  (a foreign build), reloads.
`Decision.explain()` is one log line an SRE can act on; `to_json()` is what the journal keeps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config

CORE: tuple[str, ...] = ("mlx5_core", "mlx5_ib", "ib_core")  # must be loaded to be ready
# The rest of the stack openibd loads (ib_uverbs exports the peer-memory API since 24.07).
STACK_COMPARED: tuple[str, ...] = (
    "mlx_compat", "mlxfw", "ib_uverbs", "ib_umad", "ib_ipoib", "ib_cm", "iw_cm", "rdma_cm",
    "rdma_ucm",
)
NFSRDMA_COMPARED: tuple[str, ...] = ("nvme_rdma", "rpcrdma")  # with ENABLE_NFSRDMA=true


def compared_modules(config: Config) -> tuple[str, ...]:
    """Every module whose build is compared, in the order they are reported: the core, the rest of
    the stack, the mlx5 auxiliary modules and, with ENABLE_NFSRDMA, the NFS/NVMe RDMA ULPs."""
    mods = (*CORE, *STACK_COMPARED, *config.mlx5_auxiliary_modules,
            *(NFSRDMA_COMPARED if config.enable_nfsrdma else ()))
    return tuple(dict.fromkeys(m.replace("-", "_") for m in mods))


def _clean(srcversion: str | None) -> str | None:
    """A srcversion, or None for "absent" (an empty read counts as absent)."""
    if srcversion is None:
        return None
    text = srcversion.strip()
    return text or None


@dataclass(frozen=True)
class ModuleComparison:
    """One module: loaded (in /proc/modules) or not, its loaded and installed srcversions."""

    module: str
    loaded: str | None
    installed: str | None
    present: bool = False  # loaded at all (it may be loaded with no srcversion: unversioned)
    core: bool = False

    def __post_init__(self) -> None:
        if self.loaded is not None:
            object.__setattr__(self, "present", True)

    @property
    def differs(self) -> bool:
        """A reason to reload (see the module docstring for the rules)."""
        if not self.present:
            return self.core  # the core must be loaded; any other absent module is not a reason
        if self.loaded is None:
            return True  # unversioned: cannot compare
        return self.installed is None or self.loaded != self.installed

    @property
    def to_load(self) -> bool:
        """Installed but not loaded, and not a reason to reload: load it after a swap."""
        return not self.core and not self.present and self.installed is not None

    def describe(self) -> str:
        """This module's part of the explanation, e.g. "ib_core not loaded (installed AE60...)"."""
        m, lo, ins = self.module, self.loaded, self.installed
        if not self.present:
            if ins is None:
                return f"{m} neither loaded nor installed"
            return f"{m} not loaded (installed srcversion {ins})"
        if lo is None:
            return (f"{m} has no srcversion (an unversioned, inbox build): cannot compare, "
                    "reloading")
        if ins is None:
            return f"{m} srcversion {lo} loaded but not installed (a foreign build)"
        if lo != ins:
            return f"{m} srcversion {lo} loaded ≠ {ins} installed"
        return f"{m} {lo}"

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "loaded": self.loaded, "installed": self.installed,
                "present": self.present, "differs": self.differs}


@dataclass(frozen=True)
class Decision:
    """Whether to reload, and the comparisons that say why."""

    reload: bool
    comparisons: tuple[ModuleComparison, ...]

    @property
    def differences(self) -> tuple[ModuleComparison, ...]:
        return tuple(c for c in self.comparisons if c.differs)

    @property
    def absent(self) -> tuple[str, ...]:
        """Compared modules neither loaded nor installed (no difference)."""
        return tuple(c.module for c in self.comparisons if not c.present and c.installed is None)

    @property
    def to_load(self) -> tuple[str, ...]:
        """Installed modules that are not loaded (none of them a reason to reload)."""
        return tuple(c.module for c in self.comparisons if c.to_load)

    @property
    def loaded_srcversions(self) -> dict[str, str | None]:
        """Every loaded compared module and its srcversion (None: unversioned): the marker's."""
        return {c.module: c.loaded for c in self.comparisons if c.present}

    def explain(self) -> str:
        """One line, e.g. "reload: mlx5_core srcversion A loaded ≠ B installed; unchanged: ..."."""
        if not self.comparisons:
            return "no reload: no modules compared"
        same = [c for c in self.comparisons if not c.differs and c.present]
        extra = ""
        if self.to_load:
            extra += "; installed, not loaded (no reason to reload): " + ", ".join(self.to_load)
        if not self.reload:
            names = ", ".join(c.module for c in same)
            versions = ", ".join(c.describe() for c in same)
            return f"no reload: {names} loaded = installed ({versions}){extra}"
        parts = [c.describe() for c in self.differences]
        if same:
            parts.append("unchanged: " + ", ".join(c.module for c in same))
        return "reload: " + "; ".join(parts) + extra

    def to_json(self) -> dict[str, Any]:
        return {"reload": self.reload, "explanation": self.explain(),
                "to_load": list(self.to_load),
                "modules": [c.to_json() for c in self.comparisons
                            if c.present or c.installed is not None]}


def decide(loaded: Mapping[str, str | None], installed: Mapping[str, str | None],
           modules: Sequence[str], present: Collection[str] | None = None) -> Decision:
    """Compare `modules` (each once, in the given order); reload if any one differs.

    `loaded` maps a module to its loaded srcversion; `present` is the set of loaded modules (from
    /proc/modules), which tells an unversioned loaded module from one that is not loaded; without
    it, a module counts as loaded when it has a loaded srcversion."""
    seen: dict[str, None] = dict.fromkeys(modules)
    live = set(present) if present is not None else {m for m in seen if _clean(loaded.get(m))}
    comparisons = tuple(
        ModuleComparison(m, _clean(loaded.get(m)), _clean(installed.get(m)),
                         present=m in live, core=m in CORE) for m in seen)
    return Decision(reload=any(c.differs for c in comparisons), comparisons=comparisons)


__all__ = ["CORE", "NFSRDMA_COMPARED", "STACK_COMPARED", "Decision",
           "ModuleComparison", "compared_modules", "decide"]
