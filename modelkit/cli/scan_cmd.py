"""``modelkit scan PATH...``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR
from ..errors import ModelkitError
from ..scan.engine import check_allow, scan_many
from ..scan.report import FileReport, ScanReport
from .output import Output, shown

_MARK = {"safe": "SAFE", "suspicious": "SUSPICIOUS", "unsafe": "UNSAFE", "error": "ERROR"}


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.scan/1).")
@click.option("--sarif", "sarif_path", type=click.Path(dir_okay=False), help="Also write a SARIF 2.1.0 report.")
@click.option("--allow", "allow", multiple=True, metavar="MODULE.NAME",
              help="Accept an audited global for this scan (repeatable; listed in every report).")
@click.option("--strict", is_flag=True, help="Exit 1 on suspicious files too.")
@click.option("--require-safetensors", is_flag=True, help="Reject every model file that is not .safetensors.")
@click.option("--explain", is_flag=True, help="Show fickling's decompiled view of each unsafe pickle.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar and no chatter; every file's result, the summary and errors stay.")
def scan_cmd(paths: tuple[str, ...], json_mode: bool, sarif_path: str | None, allow: tuple[str, ...], strict: bool,
             require_safetensors: bool, explain: bool, jobs: int, quiet: bool) -> None:
    """Scan model files statically; nothing in them is run.

    Folders are walked recursively (no symlink is followed). A missing or unreadable file is
    reported as ERROR and the other files are still scanned. Exit status: 0 all safe, 1 any
    unsafe (or suspicious with --strict), 2 usage error or a file that could not be scanned.
    """
    from ..paths import empty_folder_warning, iter_inputs
    from ..tempfiles import abandoned_warning

    out = Output(json_mode, quiet)
    try:
        if explain:
            from ..scan.explain import require_fickling

            require_fickling()
        allowed = check_allow(allow)
        files = list(iter_inputs(paths, lambda d: out.warn(empty_folder_warning(shown(d))), missing_ok=True,
                                 on_stale=lambda p, n: out.warn(abandoned_warning(shown(p), n))))
    except ModelkitError as exc:
        out.fail(exc, "modelkit.scan/1")
        sys.exit(EXIT_ERROR)
    if allowed:
        out.line(f"allowed by --allow (audited exceptions): {', '.join(allowed)}")
    reports: list[FileReport] = []
    for r in out.progress(scan_many(files, allowed, jobs, require_safetensors), total=len(files), desc="scan"):
        reports.append(r)
        out.result(f"{_MARK[r.verdict]:<10} {shown(r.path)}")
        for fd in r.findings:
            where = ""
            if fd.member:
                where = f" [{shown(fd.member)}" + (f" @ {fd.offset}" if fd.offset is not None else "")
                where += (f" {fd.opcode}" if fd.opcode else "") + "]"
            out.result(f"  {fd.rule} {fd.severity:<8} {fd.message}{where}")
        if explain and r.verdict == "unsafe":
            from ..scan.explain import explain as explain_report

            for member, text in explain_report(r).items():
                out.result(f"  --- {shown(member)} (decompiled by fickling) ---")
                for ln in text.splitlines()[:200]:
                    out.result(f"    {ln}")
    report = ScanReport(tuple(reports), allowed, strict)
    if sarif_path:
        from ..scan.sarif import write_sarif

        try:
            write_sarif(report, sarif_path)
        except ModelkitError as exc:
            out.fail(exc, "modelkit.scan/1")
            sys.exit(EXIT_ERROR)
    if json_mode:
        out.json(report.to_dict())
    else:
        c = report.counts
        out.result(f"{len(reports)} files: {c['safe']} safe, {c['suspicious']} suspicious, {c['unsafe']} unsafe, "
                 f"{c['error']} could not be scanned" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
    sys.exit(report.exit_code)

