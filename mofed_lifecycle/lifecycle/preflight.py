"""Before a reload touches anything: who holds the driver stack, may we unload it, in what order.

Pure, no I/O. `openibd restart` unloads and reloads the stack (`STACK`) itself and fails "module
in use" if any other module holds one of them (field notes §4). `plan` takes the holder graph read
from `/proc/modules` and `/sys/module/*/holders` and either refuses, with one reason naming the
module and what to do, or returns the modules to unload first (holders before what they hold) and
those to load again after openibd (dependencies first).

Rules: auxiliary mlx5 modules may always be unloaded; storage ULPs only with
UNLOAD_STORAGE_MODULES; other vendors' RDMA providers only with UNLOAD_THIRD_PARTY_RDMA_MODULES;
nvidia_peermem only when its refcnt is 0 (the GPU side loads it again, not us); unknown modules
never. A module whose refcnt exceeds its module holders has other users (open files, mounts,
processes): it cannot be unloaded.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..config import Config

# What `openibd restart` unloads and loads again by itself (MLNX_OFED/DOCA-OFED openibd's
# UNLOAD_MODULES and load sequence, mlx5/core parts only): we never unload these ourselves.
# Other vendors' providers it also lists (iw_cxgb4, hns_roce, ...) are THIRD_PARTY_RDMA_MODULES.
STACK: tuple[str, ...] = (
    "mlx_compat", "mlxfw", "mlx5_core", "mlx5_ib", "mlxdevm", "auxiliary", "mlx5_vfio_pci",
    "mlx5_fpga_tools", "memtrack", "mlx4_core", "mlx4_ib", "mlx4_en",
    "ib_core", "ib_uverbs", "ib_umad", "ib_ipoib", "ib_cm", "iw_cm", "rdma_cm", "rdma_ucm",
    "ib_ucm", "ib_sa", "ib_mad", "ib_addr", "ib_netlink", "ib_local_sa",
)
PEERMEM = "nvidia_peermem"


class Category(StrEnum):
    STACK = "stack"
    AUX = "aux"
    STORAGE = "storage"
    THIRD_PARTY = "third-party"
    PEERMEM = "peermem"
    UNKNOWN = "unknown"


def _canon(name: str) -> str:
    return name.replace("-", "_")


def classify(module: str, config: Config) -> Category:
    """The module's category; the stack wins over any list a user put it in."""
    m = _canon(module)
    if m in STACK:
        return Category.STACK
    if m == PEERMEM:
        return Category.PEERMEM
    if m in config.mlx5_auxiliary_modules:
        return Category.AUX
    if m in config.storage_modules:
        return Category.STORAGE
    if m in config.third_party_rdma_modules:
        return Category.THIRD_PARTY
    return Category.UNKNOWN


@dataclass(frozen=True)
class ModuleFacts:
    """A loaded module: its reference count and the modules that hold (use) it."""

    name: str
    refcnt: int
    holders: tuple[str, ...]
    permanent: bool = False  # /proc/modules "[permanent]": loaded without an exit function

    @property
    def users(self) -> int:
        """References that are not modules (open files, mounts, processes, peers)."""
        return max(0, self.refcnt - len(set(self.holders)))


@dataclass(frozen=True)
class Preflight:
    """The verdict: `refused` (first reason) or the unload / reload lists for the runner."""

    refused: str | None
    unload: tuple[str, ...]
    reload_after: tuple[str, ...]
    refusals: tuple[str, ...] = ()  # every reason, `refused` first
    categories: tuple[tuple[str, str], ...] = ()  # (module, category) of each module to unload

    @property
    def ok(self) -> bool:
        return self.refused is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "refused": self.refused, "refusals": list(self.refusals),
                "unload": list(self.unload), "reload_after": list(self.reload_after),
                "categories": dict(self.categories)}


_GATES = {
    Category.STORAGE: ("UNLOAD_STORAGE_MODULES", "unload_storage_modules"),
    Category.THIRD_PARTY: ("UNLOAD_THIRD_PARTY_RDMA_MODULES", "unload_third_party_rdma_modules"),
}
_USER_HINTS = {
    Category.STORAGE: "disconnect its NVMe-oF/iSER/SRP sessions or unmount NFS over RDMA",
    Category.THIRD_PARTY: "stop what uses that RDMA device",
    Category.AUX: "stop what uses it (e.g. vDPA devices attached to a VM)",
}


def _holds_text(m: str, facts: Mapping[str, ModuleFacts], stack: set[str],
                via: Mapping[str, str]) -> str:
    """What `m` holds that ties it to the stack: "ib_core, rdma_cm" or "ib_core via foo"."""
    direct = sorted(s for s in stack if m in facts[s].holders)
    if direct:
        return ", ".join(direct)
    chain, cur = [], via[m]
    while cur not in stack and cur not in chain:
        chain.append(cur)
        cur = via[cur]
    return f"{cur} via {' → '.join(chain)}"


def _affected(facts: Mapping[str, ModuleFacts],
              stack: set[str]) -> tuple[dict[str, str], list[str]]:
    """Every non-stack module holding a stack module directly or through others.

    Returns {module: the module it holds on its way to the stack} and holders that are missing from
    `facts` (a module list read while a module was loading or unloading)."""
    via: dict[str, str] = {}
    missing: list[str] = []
    queue = sorted(stack)
    while queue:
        held = queue.pop(0)
        for h in sorted(set(facts[held].holders)):
            if h in stack or h in via:
                continue
            via[h] = held
            if h in facts:
                queue.append(h)
            else:
                missing.append(h)
    return via, missing


def _order(nodes: set[str], facts: Mapping[str, ModuleFacts]) -> tuple[list[str], list[str]]:
    """Kahn's algorithm: holders before what they hold, ties by name. Returns (order, in cycles)."""
    edges = {m: sorted({h for h in facts[m].holders if h in nodes}) for m in nodes}
    waiting = {m: len(edges[m]) for m in nodes}  # holders not yet unloaded
    held_by: dict[str, list[str]] = {m: [] for m in nodes}  # h -> modules h holds
    for m, hs in edges.items():
        for h in hs:
            held_by[h].append(m)
    ready = [m for m in nodes if waiting[m] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        h = heapq.heappop(ready)
        order.append(h)
        for m in held_by[h]:
            waiting[m] -= 1
            if waiting[m] == 0:
                heapq.heappush(ready, m)
    return order, sorted(m for m in nodes if waiting[m] > 0)


def _reason(m: str, cat: Category, f: ModuleFacts, holds: str, config: Config) -> tuple[int, str]:
    """(rank, reason) if `m` may not be unloaded, else (0, ""). Policy refusals rank first."""
    if cat is Category.UNKNOWN:
        return 1, (f"{m} (unknown) holds {holds}; it is not in MLX5_AUXILIARY_MODULES, "
                   "STORAGE_MODULES or THIRD_PARTY_RDMA_MODULES, so the reload will not unload "
                   "it; unload it yourself, or add it to the list it belongs to")
    if cat in _GATES and not getattr(config, _GATES[cat][1]):
        return 2, (f"{m} ({cat}) holds {holds}; set {_GATES[cat][0]}=true to let the reload "
                   "unload it, or unload it yourself")
    if f.permanent:
        return 3, (f"{m} ({cat}) holds {holds} and is permanent (it has no exit function): it "
                   "cannot be unloaded before the reload; reboot the node to load the new driver")
    if cat is Category.PEERMEM and f.refcnt > 0:
        return 4, (f"{m} holds {holds} and is in use (refcnt {f.refcnt}): a GPUDirect RDMA "
                   "workload has GPU memory registered with the NIC; stop it (drain the node's GPU "
                   "pods) and the reload will unload nvidia_peermem; the GPU side loads it again")
    if f.users:
        hint = _USER_HINTS.get(cat, "stop what uses it")
        return 4, (f"{m} ({cat}) holds {holds} and has {f.users} user(s) that are not modules "
                   f"(refcnt {f.refcnt}, module holders {len(set(f.holders))}: open files, mounts "
                   f"or a process), so it cannot be unloaded; {hint}, then retry")
    return 0, ""


def plan(facts: Mapping[str, ModuleFacts], config: Config) -> Preflight:
    """Refuse, or list what to unload before `openibd restart` and load again after it."""
    facts = {_canon(k): ModuleFacts(_canon(f.name), f.refcnt,
                                    tuple(dict.fromkeys(_canon(h) for h in f.holders)),
                                    f.permanent) for k, f in facts.items()}
    stack = {m for m in facts if classify(m, config) is Category.STACK}
    via, missing = _affected(facts, stack)
    reasons: list[tuple[int, str, str]] = []
    for h in sorted(missing):
        reasons.append((0, h, f"{h} holds {via[h]} but is not in /proc/modules (a module was "
                              "loading or unloading while the module list was read); retry"))
    nodes = set(via) - set(missing)
    for m in sorted(nodes):
        stack_holders = sorted(h for h in facts[m].holders if h in stack)
        if stack_holders:
            reasons.append((0, m, f"{m} ({classify(m, config)}) holds {via[m]} but is itself held "
                                  f"by {', '.join(stack_holders)}, which only openibd unloads: "
                                  "unload them yourself, or reboot the node to load the new "
                                  "driver"))
    order, cyclic = _order(nodes, facts)
    if cyclic:
        reasons.append((0, cyclic[0], f"the holders of {', '.join(cyclic)} form a cycle, which a "
                                      "module list cannot (it was read while modules changed); "
                                      "retry"))
        order = []
    for m in sorted(nodes):
        cat = classify(m, config)
        rank, why = _reason(m, cat, facts[m], _holds_text(m, facts, stack, via), config)
        if rank:
            reasons.append((rank, m, why))
    reasons.sort(key=lambda r: (r[0], r[1]))
    refusals = tuple(r[2] for r in reasons)
    reload_after = tuple(m for m in reversed(order) if classify(m, config) in
                         (Category.AUX, Category.STORAGE, Category.THIRD_PARTY))
    return Preflight(refused=refusals[0] if refusals else None, unload=tuple(order),
                     reload_after=reload_after, refusals=refusals,
                     categories=tuple((m, str(classify(m, config))) for m in order))


__all__ = ["PEERMEM", "STACK", "Category", "ModuleFacts", "Preflight", "classify", "plan"]
