"""underfire.audit: how far a deployment can be spoofed, defenses compared, a report and a CI gate.

    from underfire.audit import audit
    report = audit(model, ["grad", my_map], (x, y), n=32)    # objects in (or names), an AuditReport out
"""

from underfire.audit.api import audit, run_in_folder
from underfire.audit.config import AuditConfig, AuditError, AuditRefused, Target
from underfire.audit.result import AuditReport, Gate, Headline, TargetResult
from underfire.audit.runner import run_audit

__all__ = ["audit", "run_in_folder", "AuditConfig", "AuditError", "AuditRefused", "Target", "AuditReport", "Gate",
           "Headline", "TargetResult", "run_audit"]
