"""The daemon runs `doctor`'s checks at start and before a reload: each finding logged once (by
id and subject) with its fix, kept in the journal for `status`, counted in the metrics. They
inform; they never change what the lifecycle does (its own checks decide a reload)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..doctor.findings import diagnose
from ..doctor.gather import gather
from ..host.node import Tools

if TYPE_CHECKING:
    from .runner import Runner


def run_doctor(r: Runner, when: str) -> None:
    try:
        findings = diagnose(gather(Tools(r.node.paths, r.node.commands), r.config,
                                   firmware_cache=r.firmware_facts))
    except Exception as e:  # noqa: BLE001 - the checks inform, never fail a step: said, no harm
        r.log.warning("doctor.unavailable", when=when, error=f"{type(e).__name__}: {e}",
                      next="run `mofed-lifecycle doctor` on the node to see which check fails")
        return
    r.journal.set(doctor=[f.to_json() for f in findings])
    for f in findings:
        if f.key in r.doctor_said:
            continue
        r.doctor_said.add(f.key)
        log = r.log.error if f.severity == "error" else r.log.warning
        log("doctor.finding", id=f.id, severity=f.severity, subject=f.subject, when=when,
            evidence=f.evidence, next=f.fix)
