"""The one output sink: commands return results; this renders them (human, JSON or quiet).

Nothing else in modelkit prints. Progress bars go to stderr and are off in JSON or quiet mode
and when stderr is not a TTY. While a bar is on screen every line goes out through tqdm's
``external_write_mode``: the bar is cleared, the line written, the bar drawn again below it, so a
result never shares a line with a bar.

``-q/--quiet`` means one thing: no progress bar and no chatter (``line``, ``warn``); results
(``result``) and errors stay. With ``--json``, stdout holds the JSON document and nothing else.

Every name that comes from the file system or from inside a file goes through ``shown`` in human
output, so a hostile name cannot move the cursor, erase a line or reverse the text on a terminal.
JSON keeps names exact.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
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
        _echo(_printable(json.dumps(payload, indent=2, ensure_ascii=False, default=str)))

    def jsonl(self, payload: Any) -> None:
        """One JSON document on one line (``--jsonl``), written at once."""
        _echo(_printable(json.dumps(payload, ensure_ascii=False, default=str)))

    def line(self, text: str = "") -> None:
        """Chatter: human mode only, and not with ``-q``."""
        if not self.quiet and not self.json_mode:
            _echo(_printable(_controls_escaped(text)))

    def result(self, text: str = "") -> None:
        """A result line: human mode only; ``-q`` keeps it."""
        if not self.json_mode:
            _echo(_printable(_controls_escaped(text)))

    def warn(self, text: str) -> None:
        if not self.quiet:
            _echo(_printable(f"modelkit: warning: {_one_line(_controls_escaped(text))}"), err=True)

    def error(self, exc: ModelkitError | str) -> None:
        if isinstance(exc, ModelkitError):
            msg = f"{shown(exc.path)}: {exc.problem}" if exc.path else exc.problem
            msg = f"{msg}. {exc.remedy}" if exc.remedy else msg
        else:
            msg = exc
        _echo(_printable(f"modelkit: error: {_one_line(_controls_escaped(msg))}"), err=True)

    def fail(self, exc: ModelkitError, schema: str) -> None:
        """Report an error that ends the command: one line on stderr and, with ``--json``,
        ``{"schema": schema, "error": exc.to_dict()}`` on stdout, so the output stays machine-readable."""
        self.error(exc)
        if self.json_mode:
            self.json({"schema": schema, "error": exc.to_dict()})

    def bars_on(self) -> bool:
        """Whether this sink draws progress bars: human mode, no ``-q``, stderr a terminal."""
        return not self.quiet and not self.json_mode and sys.stderr.isatty()

    def progress(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        """``items``, counted on a bar while they are consumed; the bar is gone when they end."""
        if not self.bars_on():
            yield from items
            return
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        try:
            for item in items:
                yield item
                bar.update(1)
        finally:
            bar.close()

    def bar(self, total: int, desc: str = "", min_total: int = 64 << 20) -> Any:
        """A byte-counting tqdm bar on stderr (size, percentage, rate, ETA), or None when bars are
        off or ``total`` is under ``min_total`` (done before a bar would tell anything)."""
        if not self.bars_on() or total < min_total:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    leave=False)

    def steps_bar(self, total: int, initial: int = 0, desc: str = "") -> Any:
        """A step-counting tqdm bar on stderr (shows it/s; callers add loss with set_postfix), or None when bars are off."""
        if not self.bars_on():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def close_bars() -> None:
    """Take every progress bar off the screen (before a last line such as "interrupted")."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        bar.close()


def _echo(text: str, err: bool = False) -> None:
    """``click.echo``; while a tqdm bar is drawn, with the bar cleared first and redrawn after."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None or not getattr(tqdm_module.tqdm, "_instances", None):
        click.echo(text, err=err)
        return
    with tqdm_module.tqdm.external_write_mode(file=sys.stderr if err else sys.stdout):
        click.echo(text, err=err)


# Named escapes, as ``ls -b`` and C write them; every other control is \xHH or \uXXXX.
_NAMED = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r",
          "\x1b": "\\e"}
# Control (C0, DEL, C1), format (bidi overrides and isolates, zero-width marks), line and paragraph
# separators, and lone surrogates (bytes of a name that are not UTF-8).
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def shown(name: str | os.PathLike[str]) -> str:
    r"""A file name or a name from inside a file, safe to print on a terminal.

    Controls (C0, DEL, C1), Unicode format characters (bidi overrides such as U+202E, zero-width
    characters), line separators and lone surrogates are written as escapes (``\e``, ``\r``,
    ``\x7f``, ``\u202e``), the way ``ls -b`` does. A backslash is written ``\\`` so the mapping
    stays one to one, except where it is the path separator (Windows), where no name can hold one.

    Args:
        name: the name as the file system or the file gives it.

    Returns:
        The same text where it is plain; otherwise the escaped form.

    Example:
        >>> shown("a\x1b[2K\rb.ckpt")
        'a\\e[2K\\rb.ckpt'
    """
    text = os.fspath(name)
    out = []
    for ch in text:
        if ch == "\\" and os.sep != "\\":
            out.append("\\\\")
        elif ch in _NAMED or unicodedata.category(ch) in _HIDDEN:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)


def _controls_escaped(text: str) -> str:
    """``text`` with every hidden character escaped as ``shown`` does, but newlines and tabs kept
    and backslashes left alone: the last guard on whole lines whose names were not passed through
    ``shown`` (a line holds text written by modelkit, where a backslash is just a backslash)."""
    return "".join(c if c in "\n\t" or (c not in _NAMED and unicodedata.category(c) not in _HIDDEN)
                   else _escape(c) for c in text)


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
