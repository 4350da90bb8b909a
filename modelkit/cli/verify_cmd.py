"""``modelkit verify SRC OUT`` and ``modelkit diff A B``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from ._words import count
from .output import Output


@click.command("verify")
@click.argument("source", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.verify/1).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay.")
def verify_cmd(source: str, output: str, json_mode: bool, quiet: bool) -> None:
    """Check that OUTPUT holds exactly SOURCE's tensors (after any dtype cast). Exit 1 if not."""
    from ..ops.verify import verify

    out = Output(json_mode, quiet)
    try:
        r = verify(source, output)
    except ModelkitError as exc:
        out.fail(exc, "modelkit.verify/1")
        sys.exit(EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
    if json_mode:
        out.json(r.to_dict())
    else:
        state = "OK" if r.ok else "MISMATCH"
        ema = f", {r.ema} from their EMA copy" if r.ema else ""
        out.result(f"{state}  {count(r.checked, 'tensor')} checked ({r.cast} cast{ema}), {len(r.mismatches)} differ")
        if r.hint:
            out.line(f"  hint: {r.hint}")
        for m in r.mismatches[:50]:
            out.line(f"  {m.name}: {m.problem}")
        if r.only_in_source:
            n = len(r.only_in_source)
            out.line(f"  {count(n, 'source tensor')} {'is' if n == 1 else 'are'} not in the output "
                     f"(first: {r.only_in_source[0]})")
    sys.exit(EXIT_OK if r.ok else EXIT_FINDINGS)


@click.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--no-values", is_flag=True, help="Compare names, shapes and dtypes only (reads no tensor data).")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.diff/1).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay.")
def diff_cmd(a: str, b: str, no_values: bool, json_mode: bool, quiet: bool) -> None:
    """Show key, shape, dtype and value differences between two model files. Exit 1 if they differ.

    With --no-values, files whose names, shapes and dtypes match are reported as "same keys,
    shapes and dtypes; values not compared" (exit 0), and the JSON has "values_compared": false:
    its "identical" then covers names, shapes, dtypes and metadata only.
    """
    from ..ops.verify import diff

    out = Output(json_mode, quiet)
    try:
        r = diff(a, b, values=not no_values)
    except ModelkitError as exc:
        out.fail(exc, "modelkit.diff/1")
        sys.exit(EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
    if json_mode:
        out.json({**r.to_dict(), "values_compared": not no_values})
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(r.counts().items()))
        if not r.identical:
            verdict = "DIFFERENT"
        elif no_values:
            verdict = "same keys, shapes and dtypes; values not compared"
        else:
            verdict = "IDENTICAL"
        out.result(f"{verdict}  {counts}")
        for e in r.entries:
            if e.change == "same":
                continue
            extra = f" max |a-b| = {e.max_abs:.6g}" if e.max_abs is not None else ""
            out.line(f"  {e.change:<7} {e.name}" + (f" {e.detail}" if e.detail else "") + extra)
        for k in r.metadata_changed:
            out.line(f"  metadata {k}")
    sys.exit(EXIT_OK if r.identical else EXIT_FINDINGS)
