"""The report's `peermem` block, measured by the simulator: pure functions over the kernel's
timeline (times relative to the run's start), the kernel's nvidia-peermem facts (`peermem` request:
loads, loaded, whether a load would fail now and why), the marker's appearances as the simulator saw
them, and how the loader process ran. Nothing the loader says about itself is used.

- `status`: "loaded" (the kernel has nvidia_peermem), "rebuild-needed" (the kernel would refuse the
  .ko on disk with EINVAL/ENOEXEC against the live stack), "failed" (the loader exited non-zero by
  itself), else "waiting";
- `loads`: the kernel's successful loads; `failed_attempts`: `peermem.load_failed` kernel events
  (`failed_before_marker`: those before the marker first appeared);
- `marker_to_load_s`: the first load after the marker appeared, from the moment both the marker
  was there and the loader was running (the loader cannot react to a marker before it starts).
"""

from __future__ import annotations

from typing import Any

REBUILD_ERRNOS = ("EINVAL", "ENOEXEC")


def measure_peermem(timeline: list[dict[str, Any]], kernel: dict[str, Any], loads_before: int,
                    marker_changes: list[tuple[float, bool]],
                    loader: dict[str, Any]) -> dict[str, Any]:
    """The contract's `peermem` block (plus the marks it was computed from)."""
    loaded_at = [ev["t"] for ev in timeline
                 if ev["event"] == "module.loaded" and ev.get("module") == "nvidia_peermem"]
    failed = [ev for ev in timeline if ev["event"] == "peermem.load_failed"]
    appeared = [t for t, present in marker_changes if present]
    first_marker = appeared[0] if appeared else None
    started = loader.get("started_s")
    to_load = None
    for t_load in loaded_at:
        before = [t for t in appeared if t <= t_load]
        if before:
            since = max(before[-1], started if started is not None else before[-1])
            to_load = round(max(0.0, t_load - since), 4)
            break
    error = kernel.get("load_error")
    if kernel.get("loaded"):
        status = "loaded"
    elif error and error.get("errno") in REBUILD_ERRNOS:
        status = "rebuild-needed"
    elif loader.get("exited_by_itself") and loader.get("exit_code"):
        status = "failed"
    else:
        status = "waiting"
    return {
        "status": status,
        "loaded": bool(kernel.get("loaded")),
        "loads": int(kernel.get("loads", 0)) - loads_before,
        "failed_attempts": len(failed),
        "failed_before_marker": sum(1 for ev in failed
                                    if first_marker is None or ev["t"] < first_marker),
        "marker_to_load_s": to_load,
        "load_error": error,
        "failures": [{"t": ev["t"], "errno": ev.get("errno"), "dmesg": ev.get("dmesg")}
                     for ev in failed],
        "marks": {"marker_appeared_s": appeared,
                  "marker_vanished_s": [t for t, present in marker_changes if not present],
                  "loaded_s": loaded_at},
        "loader": loader,
    }


def peermem_rows(p: dict[str, Any] | None) -> list[tuple[float, str]]:
    """Timeline rows for the loader and the marker (the kernel's own events are listed anyway)."""
    if not p:
        return []
    rows = [(t, "marker appeared") for t in p["marks"]["marker_appeared_s"]]
    rows += [(t, "marker vanished") for t in p["marks"]["marker_vanished_s"]]
    loader = p["loader"]
    if loader.get("started_s") is not None:
        rows.append((loader["started_s"], "peermem loader started"))
    return rows


def peermem_lines(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    loader = p["loader"]
    ran = ("never started" if loader.get("started_s") is None else
           f"exited by itself (code {loader.get('exit_code')})" if loader.get("exited_by_itself")
           else "kept running until stopped")
    lines = [f"  peermem: {p['status']}  loads {p['loads']}  failed attempts "
             f"{p['failed_attempts']} ({p['failed_before_marker']} before the marker)  "
             f"marker->load {p['marker_to_load_s'] if p['marker_to_load_s'] is not None else '-'}"
             f"s  loader {ran}"]
    if p["status"] != "loaded" and p.get("load_error"):
        e = p["load_error"]
        lines.append(f"    a load now would fail {e['errno']}: {e['dmesg']}")
    return lines


__all__ = ["measure_peermem", "peermem_lines", "peermem_rows"]
