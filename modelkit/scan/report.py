"""Scan results: frozen dataclasses with ``to_dict()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from .rules import RULES, SEVERITIES

VERDICTS = ("safe", "suspicious", "unsafe", "error")


@dataclass(frozen=True)
class Finding:
    """One piece of evidence.

    Attributes:
        rule: the rule id (``MK-P001``).
        severity: info | low | medium | high | critical.
        message: what was found, in words.
        member: the zip member or stream it was found in (``archive/data.pkl``, ``pickle #2``).
        offset: absolute byte offset in the file, where known.
        global_name: the ``module.name`` involved, for global findings.
    """

    rule: str
    severity: str
    message: str
    member: str | None = None
    offset: int | None = None
    global_name: str | None = None
    opcode: str | None = None

    @property
    def verdict(self) -> str:
        return RULES[self.rule].verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "verdict": self.verdict,
            "message": self.message,
            "member": self.member,
            "offset": self.offset,
            "global": self.global_name,
            "opcode": self.opcode,
        }


def combine(findings: list[Finding] | tuple[Finding, ...]) -> str:
    """The file's verdict: any unsafe finding wins (even before an error), then error, then suspicious."""
    verdicts = {f.verdict for f in findings}
    for v in ("unsafe", "error", "suspicious"):
        if v in verdicts:
            return v
    return "safe"


@dataclass(frozen=True)
class FileReport:
    path: str
    container: str | None
    verdict: str
    findings: tuple[Finding, ...] = ()
    pickles_scanned: int = 0
    globals_seen: tuple[str, ...] = field(default=())
    #: for a remote file: requests, bytes received, whether it was read whole, size, notes
    remote: dict[str, Any] | None = None

    @property
    def max_severity(self) -> str:
        if not self.findings:
            return "info"
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "container": self.container,
            "verdict": self.verdict,
            "max_severity": self.max_severity,
            "pickles_scanned": self.pickles_scanned,
            "globals": list(self.globals_seen),
            "findings": [f.to_dict() for f in self.findings],
            **({"remote": self.remote} if self.remote is not None else {}),
        }


@dataclass(frozen=True)
class ScanReport:
    files: tuple[FileReport, ...]
    allowed: tuple[str, ...] = ()
    strict: bool = False

    @property
    def counts(self) -> dict[str, int]:
        out = {v: 0 for v in VERDICTS}
        for f in self.files:
            out[f.verdict] += 1
        return out

    @property
    def exit_code(self) -> int:
        """1 if any file is unsafe (or suspicious, when strict), else 2 if any could not be scanned, else 0."""
        c = self.counts
        if c["unsafe"] or (self.strict and c["suspicious"]):
            return EXIT_FINDINGS
        if c["error"]:
            return EXIT_ERROR
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "modelkit.scan/1", "counts": self.counts, "allowed": list(self.allowed),
                "files": [f.to_dict() for f in self.files]}
