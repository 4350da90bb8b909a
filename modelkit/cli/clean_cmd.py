"""``modelkit clean DIR...``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR, EXIT_OK
from ..tempfiles import clean, size_text
from ._words import count
from .output import Output, shown


@click.command("clean")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, help="List the abandoned temp files; remove nothing.")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.clean/1).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay.")
def clean_cmd(folders: tuple[str, ...], dry_run: bool, json_mode: bool, quiet: bool) -> None:
    """Remove the temp files an interrupted modelkit left behind.

    A write killed by `kill -9`, a crash or a power cut leaves its hidden temp file
    (.NAME.TOKEN.modelkit-tmp). The folders are walked recursively (no symlink is followed) and
    each such file whose writer is gone is removed: its process no longer runs and it is a
    minute old, or, when its writer cannot be checked (another host, an older modelkit), an hour
    old. A temp file still being written, and any other file, is never touched. Exit status:
    0 done, 2 a file could not be removed.
    """
    out = Output(json_mode, quiet)
    result = clean(folders, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for t in result.removed:
        out.result(f"{verb}  {shown(t.path)}  ({size_text(t.size)})")
    for t in result.kept:
        why = f"its writer, pid {t.pid}, is running" if t.pid is not None else "it may still be being written"
        out.line(f"kept  {shown(t.path)}  ({size_text(t.size)}; {why})")
    for t, problem in result.failed:
        out.error(f"{shown(t.path)}: could not be removed ({problem})")
    if json_mode:
        out.json(result.to_dict())
    else:
        out.result(f"{verb} {count(len(result.removed), 'abandoned temp file')} "
                   f"({size_text(result.removed_bytes)})" + (f"; kept {len(result.kept)} in use" if result.kept else ""))
    sys.exit(EXIT_ERROR if result.failed else EXIT_OK)
