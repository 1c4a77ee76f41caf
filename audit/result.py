"""What an audit returns: :class:`AuditReport`, a typed view of the report record (report.json), and the gate
that the CLI's exit status and a CI job read from it.

    report = AuditReport.from_json("runs/default/report.json")
    report.headline.spoofability, report.headline.ci95, report.headline.status
    report.targets["fmnist_resnet@fashion-mnist"].summary["interpreters"]["grad"]["spoofability"]
    report.gate(fail_above=0.5).exit_code        # 0 pass, 3 above the bar, 4 not measured (passes no gate)
    report.write_html("audit.html")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from underfire.audit.html import render_html
from underfire.audit.report import SCHEMA_VERSION, ReportError, _atomic_write, load_report, summary_text


@dataclass(frozen=True)
class Headline:
    """The worst undefended spoofability over targets and interpreters, and whether it can pass a gate."""

    spoofability: float | None  # fraction of audited inputs spoofed; None when nothing was measured
    ci95: list[float] | None  # its exact 95% interval
    where: str | None  # "<target> / <interpreter>" where the worst value was measured
    status: str  # "measured" or "inconclusive"
    inconclusive: list[str] = field(default_factory=list)  # why the run did not measure the deployment
    lower_bound: list[str] = field(default_factory=list)  # interpreters measured only from below
    not_attacked: list[str] = field(default_factory=list)  # interpreters listed but never attacked
    untrained: str | None = None  # targets audited with random weights (asked for)
    k: int | None = None
    n: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Headline":
        return cls(d.get("spoofability"), d.get("ci95"), d.get("where"), d.get("status", "inconclusive"),
                   list(d.get("inconclusive") or []), list(d.get("lower_bound") or []),
                   list(d.get("not_attacked") or []), d.get("untrained"), d.get("k"), d.get("n"))

    @property
    def measured(self) -> bool:
        return self.status == "measured" and self.spoofability is not None

    def __str__(self) -> str:
        if not self.measured:
            return "INCONCLUSIVE: " + "; ".join(self.inconclusive or ["nothing was measured"])
        lo, hi = self.ci95
        return (f"spoofability {self.spoofability:.0%} (95% CI {lo:.0%}–{hi:.0%}, {self.k}/{self.n}) at "
                f"{self.where}")


@dataclass(frozen=True)
class Gate:
    """A gate's decision on a report: the exit status and the lines that say why (for stderr)."""

    exit_code: int  # 0 passes, 3 above --fail-above, 4 not measured (inconclusive, lower bound, untrained, ...)
    messages: list[str]

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class TargetResult:
    """One audited deployment: its settings as run, status, warnings, summaries and per-sample records."""

    key: str
    data: dict

    @property
    def summary(self) -> dict:
        return self.data["summary"]

    @property
    def status(self) -> dict:
        return self.data["status"]

    @property
    def warnings(self) -> list[str]:
        return self.data.get("warnings", [])

    @property
    def records(self) -> dict:
        return self.data["records"]

    def spoofability(self, interpreter: str) -> dict | None:
        """The undefended spoofability of one interpreter: {mean, ci95, k, n, ...}, or None if not measured."""
        return self.summary["interpreters"].get(interpreter, {}).get("spoofability")


class AuditReport:
    """The record of one audit (the content of report.json), typed where a program reads it."""

    def __init__(self, data: dict) -> None:
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
            raise ReportError(f"not an underfire report of schema version {SCHEMA_VERSION} (found {found})")
        self.data = data

    @property
    def headline(self) -> Headline:
        return Headline.from_dict(self.data["headline"])

    @property
    def targets(self) -> dict[str, TargetResult]:
        return {k: TargetResult(k, v) for k, v in self.data["targets"].items()}

    @property
    def config(self) -> dict:
        """The resolved configuration that ran (defaults filled in, exclusions applied)."""
        return self.data["config"]

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The record as JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.data, indent=1)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "AuditReport":
        """From a report.json path (or JSON text starting with ``{``)."""
        if isinstance(source, str) and source.lstrip().startswith("{"):
            try:
                return cls(json.loads(source))
            except json.JSONDecodeError as exc:
                raise ReportError(f"not a JSON report: {exc}") from exc
        return cls(load_report(source))

    def write_html(self, path: str | os.PathLike) -> Path:
        """The self-contained HTML report (rendered from the JSON record, as a reader of the file would)."""
        path = Path(path)
        _atomic_write(path, render_html(json.loads(self.to_json())))
        return path

    def summary_text(self) -> str:
        return summary_text(self.data)

    def gate(self, fail_above: float | None = None) -> Gate:
        """The CI gate: 4 when the run did not measure the deployment (inconclusive); with ``fail_above``, 3 when
        spoofability is above it, and 4 when it was measured only from below (transfer / query attacks, an
        unconverged attack ensemble), an interpreter was not attacked, or the weights were random."""
        h = self.headline
        if h.status == "inconclusive":
            return Gate(4, [f"INCONCLUSIVE: {r}" for r in h.inconclusive]
                        + ["INCONCLUSIVE: this run did not measure the deployment; it passes no gate (exit status 4)"])
        if fail_above is not None and h.spoofability > fail_above:
            return Gate(3, [f"FAIL: spoofability {h.spoofability:.0%} is above --fail-above {fail_above:.0%}"])
        notes = ([f"LOWER BOUND: {r}: a white-box attacker could spoof more" for r in h.lower_bound]
                 + [f"NOT MEASURED: {r}" for r in h.not_attacked])
        if fail_above is not None and h.lower_bound:
            return Gate(4, notes + ["INCONCLUSIVE: spoofability measured only from below (transfer / query attacks) "
                                    "cannot pass --fail-above (exit status 4)"])
        if fail_above is not None and h.not_attacked:
            return Gate(4, notes + ["INCONCLUSIVE: an interpreter the audit did not attack cannot pass --fail-above "
                                    "(exit status 4)"])
        if fail_above is not None and h.untrained:
            return Gate(4, notes + [f"INCONCLUSIVE: {h.untrained}: an audit of untrained weights passes no gate "
                                    f"(exit status 4)"])
        return Gate(0, notes)

    def __repr__(self) -> str:
        return f"AuditReport({self.data.get('name')!r}: {self.headline})"
