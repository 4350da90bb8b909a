"""The one output sink: commands return results; this renders them (human, JSON or quiet).

Nothing else in modelkit prints. Progress bars go to stderr and are off in JSON or quiet mode
and when stderr is not a TTY.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import click

from ..errors import ModelkitError

T = TypeVar("T")


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet

    def json(self, payload: Any) -> None:
        click.echo(_printable(json.dumps(payload, indent=2, ensure_ascii=False, default=str)))

    def line(self, text: str = "") -> None:
        if not self.quiet and not self.json_mode:
            click.echo(_printable(text))

    def warn(self, text: str) -> None:
        if not self.quiet:
            click.echo(_printable(f"modelkit: warning: {text}"), err=True)

    def error(self, exc: ModelkitError | str) -> None:
        msg = exc.message if isinstance(exc, ModelkitError) else exc
        click.echo(_printable(f"modelkit: error: {_one_line(msg)}"), err=True)

    def fail(self, exc: ModelkitError, schema: str) -> None:
        """Report an error that ends the command: one line on stderr and, with ``--json``,
        ``{"schema": schema, "error": exc.to_dict()}`` on stdout, so the output stays machine-readable."""
        self.error(exc)
        if self.json_mode and not self.quiet:
            self.json({"schema": schema, "error": exc.to_dict()})

    def progress(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        if self.quiet or self.json_mode or not sys.stderr.isatty():
            yield from items
            return
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)


    def bar(self, total: int, desc: str = "") -> Any:
        """A byte-counting tqdm bar on stderr, or None when bars are off."""
        if self.quiet or self.json_mode or not sys.stderr.isatty() or total < (64 << 20):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


    def steps_bar(self, total: int, initial: int = 0, desc: str = "") -> Any:
        """A step-counting tqdm bar on stderr (shows it/s; callers add loss with set_postfix), or None when bars are off."""
        if self.quiet or self.json_mode or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def _printable(text: str) -> str:
    """``text`` with lone surrogates as ``\\udcXX``: names read from a damaged or hostile file can
    hold bytes that are not UTF-8 (kept as surrogates), and a strict UTF-8 stdout would raise on
    them. In JSON the result is the standard escape of the same character."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
