"""SARIF 2.1.0 output; the ``rules`` array is generated from the rule registry."""

from __future__ import annotations

import json
import os
from typing import Any

from .. import __version__
from .report import ScanReport
from .rules import RULES

_LEVEL = {"info": "note", "low": "note", "medium": "warning", "high": "error", "critical": "error"}


def to_sarif(report: ScanReport) -> dict[str, Any]:
    rules = [
        {"id": r.id, "name": r.title.replace(" ", ""), "shortDescription": {"text": r.title},
         "help": {"text": r.help}, "defaultConfiguration": {"level": _LEVEL[r.severity]}}
        for r in RULES.values()
    ]
    results = []
    for f in report.files:
        for fd in f.findings:
            # GitHub code scanning wants a region with a start line; binary files have one "line".
            region: dict[str, Any] = {"region": {"startLine": 1}}
            if fd.offset is not None:
                region["region"].update({"byteOffset": fd.offset, "byteLength": 1})
            results.append({
                "ruleId": fd.rule,
                "level": _LEVEL[fd.severity],
                "message": {"text": fd.message + (f" (in {fd.member})" if fd.member else "")},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": f.path.replace(os.sep, "/")}, **region}}],
                "partialFingerprints": {"modelkitFinding/v1": f"{fd.rule}:{fd.member}:{fd.global_name}:{fd.offset}"},
                "properties": {"verdict": f.verdict, "severity": fd.severity},
            })
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{"tool": {"driver": {"name": "modelkit", "version": __version__,
                                      "informationUri": "https://pypi.org/project/modelkit/", "rules": rules}},
                  "results": results}],
    }


def write_sarif(report: ScanReport, path: str) -> None:
    from ..paths import write_text_atomic

    write_text_atomic(path, json.dumps(to_sarif(report), indent=2))
