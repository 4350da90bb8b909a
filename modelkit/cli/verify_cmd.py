"""``modelkit verify SRC OUT`` and ``modelkit diff A B``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from .output import Output


@click.command("verify")
@click.argument("source", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.verify/1).")
def verify_cmd(source: str, output: str, json_mode: bool) -> None:
    """Check that OUTPUT holds exactly SOURCE's tensors (after any dtype cast). Exit 1 if not."""
    from ..ops.verify import verify

    out = Output(json_mode)
    try:
        r = verify(source, output)
    except ModelkitError as exc:
        out.fail(exc, "modelkit.verify/1")
        sys.exit(EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
    if json_mode:
        out.json(r.to_dict())
    else:
        state = "OK" if r.ok else "MISMATCH"
        out.line(f"{state}  {r.checked} tensors checked ({r.cast} cast), {len(r.mismatches)} differ")
        for m in r.mismatches[:50]:
            out.line(f"  {m.name}: {m.problem}")
        if r.only_in_source:
            out.line(f"  {len(r.only_in_source)} source tensors are not in the output (first: {r.only_in_source[0]})")
    sys.exit(EXIT_OK if r.ok else EXIT_FINDINGS)


@click.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--no-values", is_flag=True, help="Compare names, shapes and dtypes only (reads no tensor data).")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.diff/1).")
def diff_cmd(a: str, b: str, no_values: bool, json_mode: bool) -> None:
    """Show key, shape, dtype and value differences between two model files. Exit 1 if they differ."""
    from ..ops.verify import diff

    out = Output(json_mode)
    try:
        r = diff(a, b, values=not no_values)
    except ModelkitError as exc:
        out.fail(exc, "modelkit.diff/1")
        sys.exit(EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
    if json_mode:
        out.json(r.to_dict())
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(r.counts().items()))
        out.line(f"{'IDENTICAL' if r.identical else 'DIFFERENT'}  {counts}")
        for e in r.entries:
            if e.change == "same":
                continue
            extra = f" max |a-b| = {e.max_abs:.6g}" if e.max_abs is not None else ""
            out.line(f"  {e.change:<7} {e.name} {e.detail}{extra}")
        for k in r.metadata_changed:
            out.line(f"  metadata {k}")
    sys.exit(EXIT_OK if r.identical else EXIT_FINDINGS)
