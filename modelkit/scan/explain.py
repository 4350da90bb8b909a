"""``modelkit scan --explain``: fickling's decompiled view of each pickle with a finding.

fickling reads the pickle statically and prints it as the Python it would run. It never
decides a verdict here; it only shows the evidence in a readable form. So it is not in the core
install: ``pip install 'modelkit[explain]'`` adds it (it is LGPL-licensed and used for nothing
else), and ``--explain`` without it stops with that command before scanning.
"""

from __future__ import annotations

import ast

from ..errors import MissingExtraError, ModelkitError
from ..formats.zipdir import read_directory, read_member
from ..model import Source
from .report import FileReport

MAX_EXPLAIN_BYTES = 8 * 1024 * 1024


def require_fickling() -> None:
    """A MissingExtraError (one line, exit 2) when fickling is not installed."""
    from .._torch import installed

    if not installed("fickling"):
        raise MissingExtraError(None, "--explain needs fickling, which is not installed",
                                "Install it with: pip install 'modelkit[explain]'")


def _decompile(data: bytes) -> str:
    from fickling.fickle import Pickled

    try:
        return ast.unparse(Pickled.load(data).ast)
    except Exception as exc:  # noqa: BLE001 - fickling fails on broken pickles; say so
        return f"(fickling could not decompile this pickle: {type(exc).__name__}: {exc})"


def explain(report: FileReport) -> dict[str, str]:
    """Decompiled views of the pickles that carry unsafe findings, by member name."""
    members = {f.member for f in report.findings if f.verdict == "unsafe" and f.member}
    out: dict[str, str] = {}
    if not members or report.container is None:
        return out
    try:
        src = Source(report.path)
    except OSError:
        return out
    try:
        for member in sorted(members):
            data = _member_bytes(report, src, member)
            if data is not None:
                out[member] = _decompile(data[:MAX_EXPLAIN_BYTES])
    except ModelkitError as exc:
        out["(error)"] = exc.problem
    finally:
        src.close()
    return out


def _member_bytes(report: FileReport, src: Source, member: str) -> bytes | None:
    if report.container == "zip":
        zd = read_directory(report.path, src)
        entry = zd.by_name.get(member.split(" (pickle #")[0])
        return read_member(report.path, src, entry) if entry is not None else None
    if report.container in ("pickle", "torch-legacy"):
        return src.pread(min(src.size, MAX_EXPLAIN_BYTES), 0)
    return None
