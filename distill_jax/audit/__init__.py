"""Distillation audit: was this student distilled from one of these teachers, or from none?

Given a student's weights and query access to K candidate teachers (after Shi, Zheng, Song and
Yeh, "Knowledge Distillation Detection for Open-weights Models", NeurIPS 2025): probe inputs
(`probes`: held-out real data, data-free inputs synthesised from the student, inputs where the
candidates disagree) -> per-candidate alignment scores (`scores`) -> a decision calibrated by
control students trained without the candidates (`decision`) -> a report (`report`).

    distill-jax audit --student=runs/kd --candidates=runs/t1,runs/t2 --controls=runs/c1,runs/c2

See docs/audit.md.
"""

from distill_jax.audit.decision import (
    NONE,
    Comparison,
    Decision,
    accuse,
    attribute,
    compare,
    holm,
)
from distill_jax.audit.probes import PROBES, Probe, ProbeContext, register_probe, synthesize
from distill_jax.audit.report import write_report
from distill_jax.audit.run import run_audit
from distill_jax.audit.subjects import AuditError, Exported, QueryOnly, load_exported, query_only

__all__ = [
    "NONE",
    "PROBES",
    "AuditError",
    "Comparison",
    "Decision",
    "Exported",
    "Probe",
    "ProbeContext",
    "QueryOnly",
    "compare",
    "accuse",
    "attribute",
    "holm",
    "load_exported",
    "query_only",
    "register_probe",
    "run_audit",
    "synthesize",
    "write_report",
]
