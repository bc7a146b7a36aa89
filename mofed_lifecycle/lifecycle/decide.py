"""The reload decision: is the driver that is loaded the driver that is installed? Pure, no I/O.

For each compared module the loaded srcversion (`/sys/module/<m>/srcversion`) is set against the
installed one (`modinfo -F srcversion <m>`). Any difference reloads: a module missing on either side
is a difference, never a match (field notes §3.6). `Decision.explain()` is one log line an SRE can
act on without reading the code; `to_json()` is what the journal keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config

ALWAYS_COMPARED: tuple[str, ...] = ("mlx5_core", "mlx5_ib", "ib_core")
NFSRDMA_COMPARED: tuple[str, ...] = ("nvme_rdma", "rpcrdma")  # with ENABLE_NFSRDMA=true


def compared_modules(config: Config) -> tuple[str, ...]:
    """The modules whose srcversions decide a reload, in the order they are reported."""
    return ALWAYS_COMPARED + (NFSRDMA_COMPARED if config.enable_nfsrdma else ())


def _clean(srcversion: str | None) -> str | None:
    """A srcversion, or None for "absent" (an empty read counts as absent)."""
    if srcversion is None:
        return None
    text = srcversion.strip()
    return text or None


@dataclass(frozen=True)
class ModuleComparison:
    """One module: its loaded and installed srcversions (None: not loaded / not installed)."""

    module: str
    loaded: str | None
    installed: str | None

    @property
    def differs(self) -> bool:
        """True unless both sides are present and equal."""
        return self.loaded is None or self.installed is None or self.loaded != self.installed

    def describe(self) -> str:
        """This module's part of the explanation, e.g. "ib_core not loaded (installed AE60...)"."""
        m, lo, ins = self.module, self.loaded, self.installed
        if lo is None and ins is None:
            return f"{m} neither loaded nor installed (modinfo found no srcversion)"
        if lo is None:
            return f"{m} not loaded (installed srcversion {ins})"
        if ins is None:
            return f"{m} srcversion {lo} loaded but not installed (modinfo found no srcversion)"
        if lo != ins:
            return f"{m} srcversion {lo} loaded ≠ {ins} installed"
        return f"{m} {lo}"

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "loaded": self.loaded, "installed": self.installed,
                "differs": self.differs}


@dataclass(frozen=True)
class Decision:
    """Whether to reload, and the comparisons that say why."""

    reload: bool
    comparisons: tuple[ModuleComparison, ...]

    @property
    def differences(self) -> tuple[ModuleComparison, ...]:
        return tuple(c for c in self.comparisons if c.differs)

    def explain(self) -> str:
        """One line, e.g. "reload: mlx5_core srcversion A loaded ≠ B installed; ib_core not
        loaded (installed srcversion C); unchanged: mlx5_ib"."""
        if not self.comparisons:
            return "no reload: no modules compared"
        same = [c for c in self.comparisons if not c.differs]
        if not self.reload:
            names = ", ".join(c.module for c in self.comparisons)
            versions = ", ".join(c.describe() for c in same)
            if self.differences:  # a caller built a no-reload Decision despite differences
                versions += "; differences ignored: " + "; ".join(
                    c.describe() for c in self.differences)
                names = ", ".join(c.module for c in same)
            return f"no reload: {names} loaded = installed ({versions})"
        parts = [c.describe() for c in self.differences]
        if same:
            parts.append("unchanged: " + ", ".join(c.module for c in same))
        return "reload: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"reload": self.reload, "explanation": self.explain(),
                "modules": [c.to_json() for c in self.comparisons]}


def decide(loaded: Mapping[str, str | None], installed: Mapping[str, str | None],
           modules: Sequence[str]) -> Decision:
    """Compare `modules` (each once, in the given order); reload if any one differs.

    A module absent from a mapping, or mapped to None or "", is missing on that side."""
    seen: dict[str, None] = dict.fromkeys(modules)
    comparisons = tuple(
        ModuleComparison(m, _clean(loaded.get(m)), _clean(installed.get(m))) for m in seen)
    return Decision(reload=any(c.differs for c in comparisons), comparisons=comparisons)


__all__ = ["ALWAYS_COMPARED", "NFSRDMA_COMPARED", "Decision", "ModuleComparison",
           "compared_modules", "decide"]
