"""``modelkit scan PATH...``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR
from ..errors import ModelkitError
from ..scan.engine import scan_file
from ..scan.report import ScanReport
from .output import Output

_MARK = {"safe": "SAFE", "suspicious": "SUSPICIOUS", "unsafe": "UNSAFE", "error": "ERROR"}


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.scan/1).")
@click.option("--sarif", "sarif_path", type=click.Path(dir_okay=False), help="Also write a SARIF 2.1.0 report.")
@click.option("-q", "--quiet", is_flag=True, help="Print only unsafe files.")
def scan_cmd(paths: tuple[str, ...], json_mode: bool, sarif_path: str | None, quiet: bool) -> None:
    """Scan model files statically; nothing in them is run.

    Exit status: 0 all safe, 1 something unsafe or suspicious, 2 a file could not be scanned.
    """
    from ..paths import iter_inputs

    out = Output(json_mode, quiet=False)
    try:
        files = list(iter_inputs(paths))
    except ModelkitError as exc:
        out.error(exc)
        sys.exit(EXIT_ERROR)
    reports = []
    for f in out.progress(files, total=len(files), desc="scan"):
        r = scan_file(f)
        reports.append(r)
        if quiet and r.verdict == "safe":
            continue
        out.line(f"{_MARK[r.verdict]:<10} {r.path}")
        for fd in r.findings:
            if fd.severity == "info" and quiet:
                continue
            where = f" [{fd.member}" + (f" @ {fd.offset}" if fd.offset is not None else "") + "]" if fd.member else ""
            out.line(f"  {fd.rule} {fd.severity:<8} {fd.message}{where}")
    report = ScanReport(tuple(reports))
    if sarif_path:
        from ..scan.sarif import write_sarif

        write_sarif(report, sarif_path)
    if json_mode:
        out.json(report.to_dict())
    else:
        c = report.counts
        out.line(f"{len(reports)} files: {c['safe']} safe, {c['suspicious']} suspicious, {c['unsafe']} unsafe, "
                 f"{c['error']} could not be scanned")
    sys.exit(report.exit_code)
