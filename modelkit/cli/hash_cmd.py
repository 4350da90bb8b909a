"""``modelkit hash PATH... [--algo ...] [--check]``"""

from __future__ import annotations

import os
import sys

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from ..ops.hashes import ALGOS, DEFAULT_ALGOS, check, hash_file
from ..paths import empty_folder_warning, iter_inputs
from .output import Output, shown

_LABEL = {"sha256": "SHA256", "autov1": "AutoV1", "autov2": "AutoV2", "autov3": "AutoV3", "crc32": "CRC32",
          "blake3": "BLAKE3"}


@click.command("hash")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--algo", "algos", multiple=True, type=click.Choice(ALGOS),
              help=f"Hashes to compute (repeatable; default: {', '.join(DEFAULT_ALGOS)}).")
@click.option("--check", "do_check", is_flag=True, help="Compare hashes embedded in the metadata with the computed ones.")
@click.option("--no-cache", is_flag=True,
              help="Read the file even when its hashes are cached (the cache keeps the hashes of files "
                   "unchanged since; MODELKIT_HASH_CACHE=0 turns it off).")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.hash/1).")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar and no chatter; every file's hashes and errors stay.")
def hash_cmd(paths: tuple[str, ...], algos: tuple[str, ...], do_check: bool, no_cache: bool, json_mode: bool,
             quiet: bool) -> None:
    """Hash model files in one streaming read each (the hashes A1111 and Civitai show).

    A missing or unreadable file gets one error line and the other files are still hashed. Exit
    status: 0 all hashed (and, with --check, every comparable embedded hash matches), 1 a mismatch
    or a file --check refuses to read as unsafe, else 2 a file that could not be hashed or a usage error.
    """
    out = Output(json_mode, quiet)
    chosen = tuple(algos) or DEFAULT_ALGOS
    if do_check:
        chosen = tuple(dict.fromkeys((*chosen, "sha256", "autov3")))
    rows: list[dict[str, object]] = []
    findings = errors = False
    try:
        files = list(iter_inputs(paths, lambda d: out.warn(empty_folder_warning(shown(d))), missing_ok=True))
    except ModelkitError as exc:
        out.fail(exc, "modelkit.hash/1")
        sys.exit(EXIT_ERROR)
    for f in files:
        try:
            res = _hash_one(out, f, chosen, not no_cache)
            if do_check:
                res = check(res, _metadata(f))
        except ModelkitError as exc:
            out.error(exc)
            rows.append({"path": f, **exc.to_dict()})
            unsafe = isinstance(exc, UnsafeFileError)  # a finding, as in every other command
            findings, errors = findings or unsafe, errors or not unsafe
            continue
        findings = findings or res.mismatches > 0
        rows.append(res.to_dict())
        out.result(shown(f) + ("  (hashes from the cache)" if res.cached else ""))
        for k in chosen:
            if k in res.hashes:
                out.result(f"  {_LABEL[k]:<7} {res.hashes[k]}")
        for c in res.checks:
            state = {True: "ok", False: "MISMATCH", None: "not comparable"}[c.ok]
            out.result(f"  check   {shown(c.key)}: {state} (embedded {shown(c.embedded)}" +
                       (f", computed {c.computed})" if c.computed else ")") + f"  {c.note}")
        if res.check_note:
            out.result(f"  check   {res.check_note}")
    if json_mode:
        out.json({"schema": "modelkit.hash/1", "files": rows})
    sys.exit(EXIT_FINDINGS if findings else EXIT_ERROR if errors else EXIT_OK)


def _hash_one(out: Output, path: str, algos: tuple[str, ...], use_cache: bool):  # type: ignore[no-untyped-def]
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    bar = out.bar(size, os.path.basename(path))
    try:
        return hash_file(path, algos, progress=bar.update if bar else None, use_cache=use_cache)
    finally:
        if bar:
            bar.close()


def _metadata(path: str) -> dict[str, str]:
    from ..reading import open_model

    with open_model(path) as mf:
        return dict(mf.metadata)
