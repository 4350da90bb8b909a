"""``modelkit scan PATH...``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR
from ..errors import InputNotFoundError, ModelkitError, UsageError
from ..scan.engine import check_allow, scan_many
from ..scan.report import FileReport, ScanReport
from ._words import count
from .output import Output, human_bytes, shown

_MARK = {"safe": "SAFE", "suspicious": "SUSPICIOUS", "unsafe": "UNSAFE", "error": "ERROR"}


def read_manifest(path: str) -> list[str]:
    """The paths a manifest lists: one per line, blank lines and ``#`` comments skipped.

    Raises:
        InputNotFoundError: the manifest cannot be read.
    """
    try:
        if path == "-":
            text = str(sys.stdin.read())
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputNotFoundError(path, f"cannot read the manifest ({exc})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@click.command("scan")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.scan/1).")
@click.option("--sarif", "sarif_path", type=click.Path(dir_okay=False), help="Also write a SARIF 2.1.0 report.")
@click.option("--allow", "allow", multiple=True, metavar="MODULE.NAME",
              help="Accept an audited global for this scan (repeatable; listed in every report).")
@click.option("--strict", is_flag=True, help="Exit 1 on suspicious files too.")
@click.option("--require-safetensors", is_flag=True, help="Reject every model file that is not .safetensors.")
@click.option("--explain", is_flag=True, help="Show fickling's decompiled view of each unsafe pickle.")
@click.option("--manifest", "manifests", multiple=True, type=click.Path(dir_okay=False),
              help="A file listing paths or URLs to scan, one per line ('-': standard input; # comments).")
@click.option("--jsonl", is_flag=True, help="Print one JSON result per line as each file finishes (for pipelines).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Files scanned at once: processes for local files, threads when any is remote.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar and no chatter; every file's result, the summary and errors stay.")
def scan_cmd(paths: tuple[str, ...], json_mode: bool, sarif_path: str | None, allow: tuple[str, ...], strict: bool,
             require_safetensors: bool, explain: bool, manifests: tuple[str, ...], jsonl: bool, jobs: int,
             quiet: bool) -> None:
    """Scan model files statically; nothing in them is run.

    Folders are walked recursively (no symlink is followed). A PATH may be a URL: https://...,
    hf://ORG/REPO[@REV]/FILE (or hf://ORG/REPO for every model file in it), or any fsspec URL
    (s3://...); only the bytes a scan needs are fetched, by range requests. A missing or
    unreadable file is reported as ERROR and the other files are still scanned. Exit status: 0
    all safe, 1 any unsafe (or suspicious with --strict), 2 usage error or a file that could not
    be scanned.
    """
    from ..paths import empty_folder_warning, iter_inputs
    from ..tempfiles import abandoned_warning

    if jsonl and (json_mode or explain):
        Output().fail(UsageError(None, "--jsonl goes with neither --json nor --explain"), "modelkit.scan/1")
        sys.exit(EXIT_ERROR)
    out = Output(json_mode or jsonl, quiet)
    try:
        if not paths and not manifests:
            raise UsageError(None, "nothing to scan: give PATHS or --manifest FILE")
        paths = (*paths, *(p for m in manifests for p in read_manifest(m)))
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
    for r in out.progress(scan_many(files, allowed, jobs, require_safetensors, ordered=not jsonl), total=len(files),
                          desc="scan"):
        reports.append(r)
        if jsonl:
            out.jsonl(r.to_dict())
            continue
        out.result(f"{_MARK[r.verdict]:<10} {shown(r.path)}")
        for fd in r.findings:
            where = ""
            if fd.member:
                where = f" [{shown(fd.member)}" + (f" @ {fd.offset}" if fd.offset is not None else "")
                where += (f" {fd.opcode}" if fd.opcode else "") + "]"
            out.result(f"  {fd.rule} {fd.severity:<8} {fd.message}{where}")
        if r.remote is not None:
            for note in r.remote.get("notes", ()):
                out.result(f"  note: {note}")
            size = r.remote.get("size")
            of = f" of {human_bytes(size)}" if isinstance(size, int) and size >= 0 else ""
            out.line(f"  fetched {human_bytes(int(r.remote['bytes']))}{of} in {count(int(r.remote['requests']), 'request')}")
            pinned = [f"read at commit {r.remote['commit']}"] if r.remote.get("commit") else []
            if r.remote.get("sha256"):  # checked only where the whole file was read
                pinned.append(f"the Hub's sha256 {r.remote['sha256']} "
                              + ("(the bytes match it)" if r.remote.get("sha256_checked") else
                                 "(not checked: a scan reads ranges; check a download against it)"))
            if pinned:  # what a download must match to be the file scanned
                out.line(f"  {'; '.join(pinned)}")
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
    if jsonl:
        pass
    elif json_mode:
        out.json(report.to_dict())
    else:
        c = report.counts
        out.result(f"{len(reports)} files: {c['safe']} safe, {c['suspicious']} suspicious, {c['unsafe']} unsafe, "
                 f"{c['error']} could not be scanned" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
    sys.exit(report.exit_code)

