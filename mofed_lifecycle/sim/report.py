"""What `sim run` measures about VF restore, from the simulator's own records only.

Pure functions over the kernel's timeline (`.sim/timeline.jsonl`, times relative to the run's start)
and the ground truth before and after the run (`sim state`), never over anything the daemon says:

- `compare_vfs`: which VFs are back exactly as they were (every field of their `state` entry);
- `measure_restore`: `restore_s` (PF back after the reload -> the last kernel event on a VF that is
  back) and `disruption_s` (first VF gone -> that same event), plus the marks they come from;
The floors they are compared with are scheduled in `floor.py` (the static `restore_limit_s` has
every PF back at once; the node floor schedules each PF's VFs from when that PF came back).
"""

from __future__ import annotations

from typing import Any

from ..host.netlink_types import ZERO_MAC
from .peermem_report import peermem_lines, peermem_rows

# Kernel events that move a VF towards its old state; the last one on a restored VF ends restore.
VF_RESTORE_EVENTS = frozenset(
    {"netdev.appeared", "netdev.named", "link.set", "vf.set", "pci.bound"})
# Kernel events that take a VF away: the first one starts the disruption.
VF_GONE_EVENTS = frozenset({"netdev.removed", "pci.unbound"})


def vf_entries(state: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """(PF PCI, VF index) -> the VF's ground-truth entry, as compared: a VF whose admin MAC is all
    zero gets a random netdev MAC at every probe (mlx5), so its netdev MAC is not compared."""
    return {(pf_pci, int(idx)): ({k: v for k, v in entry.items() if k != "netdev_mac"}
                                 if entry.get("mac") == ZERO_MAC else entry)
            for pf_pci, pf in (state.get("pfs") or {}).items()
            for idx, entry in (pf.get("vfs") or {}).items()}


def compare_vfs(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """{"total", "restored", "failed"}: a VF is restored when its entry after equals the one before
    in every field; each failed one is {"pci", "pf", "index", "differs": [fields]} ("missing" when
    the VF is not there at all), sorted by PCI address."""
    old, new = vf_entries(before), vf_entries(after)
    failed = []
    for (pf, index), entry in old.items():
        now = new.get((pf, index))
        if now == entry:
            continue
        differs = (["missing"] if now is None else
                   sorted(k for k in entry.keys() | now.keys() if entry.get(k) != now.get(k)))
        failed.append({"pci": entry.get("pci"), "pf": pf, "index": index, "differs": differs})
    failed.sort(key=lambda f: (str(f["pci"]), f["pf"], f["index"]))
    return {"total": len(old), "restored": len(old) - len(failed), "failed": failed}


def restored_pcis(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    new = vf_entries(after)
    return {e["pci"] for key, e in vf_entries(before).items() if new.get(key) == e}


def _pf_pcis(*states: dict[str, Any]) -> set[str]:
    return {pci for st in states for pci in (st.get("pfs") or {})}


def pf_back_times(timeline: list[dict[str, Any]], pfs: set[str], since: float) -> dict[str, float]:
    """PF PCI -> when its netdev was back after `since`: named by udev, or appeared if never
    renamed (rename off)."""
    named: dict[str, float] = {}
    appeared: dict[str, float] = {}
    for ev in timeline:
        pci = ev.get("pci")
        if ev["t"] < since or pci not in pfs:
            continue
        if ev["event"] == "netdev.named":
            named.setdefault(pci, ev["t"])
        elif ev["event"] == "netdev.appeared":
            appeared.setdefault(pci, ev["t"])
    return {pci: named.get(pci, appeared.get(pci)) for pci in named.keys() | appeared.keys()}


def _is_restore_work(ev: dict[str, Any]) -> bool:
    """An event that changed something about a VF (a no-op vf.set / link.set changes nothing)."""
    return ev["event"] in VF_RESTORE_EVENTS and (
        ev["event"] not in ("vf.set", "link.set") or bool(ev.get("changed", True)))


def measure_restore(timeline: list[dict[str, Any]], before: dict[str, Any],
                    after: dict[str, Any]) -> dict[str, Any]:
    """The restore figures of one run, from its kernel timeline and ground truth.

    `restore_s`: from the first PF back after the last `openibd.loaded` (from the run's start when
    nothing was reloaded) to the last VF-restoring event on a VF that is back as it was; None when
    no such event happened (nothing reloaded and no VF touched, or no VF came back).
    `disruption_s`: from the first VF taken away (netdev removed, unbound, numvfs 0) before that
    reload to the same last event; None without a reload.
    """
    vfs = compare_vfs(before, after)
    pfs = _pf_pcis(before, after)
    all_vfs = {e["pci"] for st in (before, after) for e in vf_entries(st).values()}
    ok = restored_pcis(before, after)
    loads = [ev["t"] for ev in timeline if ev["event"] == "openibd.loaded"]
    reloaded = bool(loads)
    pf_back = pf_back_times(timeline, pfs, loads[-1]) if reloaded else {}
    start = min(pf_back.values(), default=None) if reloaded else 0.0
    last: dict[str, Any] | None = None
    if start is not None:
        for ev in timeline:
            if (ev["t"] >= start and ev.get("pci") in ok and _is_restore_work(ev)
                    and (last is None or ev["t"] >= last["t"])):
                last = ev
    gone = None
    if reloaded:
        gone = next((ev["t"] for ev in timeline if ev["t"] <= loads[-1] and (
            (ev["event"] in VF_GONE_EVENTS and ev.get("pci") in all_vfs)
            or (ev["event"] == "sriov.numvfs" and ev.get("numvfs") == 0))), None)
    end = last["t"] if last is not None else None
    return {
        "reloaded": reloaded,
        "vfs": vfs,
        "restore_s": _span(start, end),
        "disruption_s": _span(gone, end),
        "marks": {
            "vfs_gone_s": gone, "driver_loaded_s": loads[-1] if reloaded else None,
            "pf_back_s": start, "last_vf_s": end,
            "last_vf": None if last is None else {"pci": last["pci"], "event": last["event"]},
            "pf_back": dict(sorted(pf_back.items())),
        },
    }


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(max(0.0, end - start), 6)


def ratio(value: float | None, floor: float | None) -> float | None:
    return round(value / floor, 4) if value is not None and floor else None


def restore_lines(r: dict[str, Any], max_failed: int = 10) -> list[str]:
    """Human lines for the report's restore figures (the end of `sim run`'s timeline)."""
    floor = r.get("restore_limit_s")
    lines = []
    if r.get("restore_s") is None:
        why = ("no VF came back as it was" if r.get("reloaded") and r["vfs"]["total"]
               else "nothing to restore")
        lines.append(f"  restore_s -  ({why}) vs floor {floor or 0:.4f}")
    else:
        x = f" (x{r['restore_ratio']:.2f})" if r.get("restore_ratio") is not None else ""
        lines.append(f"  restore_s {r['restore_s']:.4f} vs floor {floor or 0:.4f}{x}")
        node = r.get("restore_limit_node_s")
        if node is not None and floor is not None and node > floor + 1e-6:
            xn = f" (x{r['restore_ratio_node']:.2f})" if r.get("restore_ratio_node") else ""
            lines.append(f"  restore_s vs the floor given when each PF came back in this run: "
                         f"{node:.4f}{xn}")
    if r.get("disruption_s") is not None:
        lines.append(f"  disruption_s {r['disruption_s']:.4f} (first VF gone -> last VF back)")
    vfs = r["vfs"]
    lines.append(f"  VFs restored {vfs['restored']}/{vfs['total']}")
    for f in vfs["failed"][:max_failed]:
        lines.append(f"    VF {f['pci']} (PF {f['pf']} #{f['index']}) differs: "
                     f"{', '.join(f['differs'])}")
    if len(vfs["failed"]) > max_failed:
        lines.append(f"    ... and {len(vfs['failed']) - max_failed} more (see the report)")
    d = r.get("daemon") or {}
    if d.get("cpu_s") is not None:
        k = (r.get("simulator") or {}).get("kernel_cpu_s")
        sim = "" if k is None else f"; simulated kernel {k:.3f} CPU s"
        lines.append(f"  daemon: {d['cpu_s']:.3f} CPU s, peak RSS {d['max_rss_mib']:.1f} MiB, "
                     f"udev events via {d.get('udev', '?')}{sim}")
    return lines


def grouped_events(timeline: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """Kernel events for humans: a run of the same event (50 netdevs removed) is one line."""
    out: list[tuple[float, str]] = []
    i = 0
    while i < len(timeline):
        ev = timeline[i]
        j = i
        while j + 1 < len(timeline) and timeline[j + 1]["event"] == ev["event"]:
            j += 1
        detail = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("t", "event"))
        if j == i:
            out.append((ev["t"], f"{ev['event']}  {detail}"))
        else:
            last = timeline[j]
            out.append((ev["t"], f"{ev['event']} x{j - i + 1} until {last['t']:.4f}s  (first: "
                                 f"{detail})"))
        i = j + 1
    return out


def format_timeline(run: Any) -> str:
    """A short human timeline of a `SimRun`: the node, the lifecycle's states and the kernel's
    events, the outcome and the restore figures."""
    r = run.report
    before = r["state_before"]
    mods = before["modules"]
    lines = [
        f"scenario {r['scenario']}  (time_scale {r['time_scale']}: divide times by it for a "
        "real node)",
        f"  node: kernel {before['kernel']}, driver {before['driver']['loaded_version']} loaded "
        f"(mlx5_core {mods.get('mlx5_core', {}).get('srcversion', '-')})",
    ]
    for pci, pf in before["pfs"].items():
        lines.append(f"  PF {pci} {pf['name']} ({pf['link']}, mtu {pf['mtu']}, eswitch "
                     f"{pf['eswitch']}): {pf['numvfs']} VFs")
    rows = [(p["start_s"], f"state  {p['name']}") for p in r["phases"]]
    rows += [(t, f"kernel {text}") for t, text in grouped_events(run.timeline)]
    rows += [(t, f"gpu    {text}") for t, text in peermem_rows(r.get("peermem"))]
    rows += [(e["t"], f"build  {e['event']}") for e in r.get("build_events") or []]
    for t, text in sorted(rows, key=lambda x: x[0]):
        lines.append(f"  {t:9.4f}s  {text}")
    lines.append(f"  outcome: {r['outcome']}  reloaded: {r['reloaded']}  exit code: "
                 f"{r['exit_code']}  took {r['duration_s']:.3f}s")
    if r["reason"]:
        lines.append(f"  reason: {r['reason']}")
    if (p := r.get("provision")) and p["mode"] != "precompiled":
        detect = f", dtk_detect_s {r['dtk_detect_s']}" if r.get("dtk_detect_s") is not None \
            else ""
        lines.append(f"  provision: {p['mode']}, cache_hit {p['cache_hit']}, builds {p['builds']}"
                     f", build_s {r.get('build_s')}{detect}")
    lines += restore_lines(r)
    lines += peermem_lines(r.get("peermem"))
    if r["outcome"] != "ready" and run.log_tail:
        lines.append("  last lines of the daemon's log:")
        lines += [f"    {line}" for line in run.log_tail]
    return "\n".join(lines)
