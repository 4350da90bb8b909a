"""Remote inputs of ``convert`` and ``prune``: the file is downloaded whole, once, into a private temp
folder beside the output (a modelkit temp name, so an abandoned one is found and swept like any
other), under its own name; the local command then runs on that copy exactly as on a downloaded file
(scan first, then the allow-list reader), and the folder goes when the command ends, however it ends.

The download is checked as every remote read is: the length the server gave, the body's length, the
same ``ETag``/``Last-Modified`` as the first answer; anything else fails closed (``RemoteError``),
and nothing is written. There is no size cap: the user asked for the whole file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .. import tempfiles
from ..errors import ModelkitError
from ..paths import ensure_room, temp_path
from . import parse_hf, require

R = TypeVar("R")
#: The ``progress`` name the download's bytes are reported under.
DOWNLOAD = "(download)"


def remote_name(url: str) -> str:
    """The file name a URL names (its path's last part, unquoted), made safe as a local name.

    Example:
        >>> remote_name("https://host/a/v1-5%20pruned.ckpt?download=true"), remote_name("hf://org/repo@main/x/y.pt")
        ('v1-5 pruned.ckpt', 'y.pt')
    """
    if url.lower().startswith("hf://"):
        path = parse_hf(url).path or ""
    else:
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    name = "".join("_" if c in '<>:"/\\|?*' or ord(c) < 32 else c for c in name).strip(" .")
    if len(name) > 120:  # a file name fits in NAME_MAX (255 bytes) in any encoding; the extension is kept
        stem, dot, ext = name.rpartition(".")
        name = stem[:100] + "~" + dot + ext[:16] if dot and len(ext) <= 16 else name[:120]
    return name or "model"


def remote_size(url: str) -> int:
    """The length of a remote file (one small ranged request); 0 when it cannot be told now (the
    command's own download then says what is wrong)."""
    from .source import RemoteSource

    try:
        src = RemoteSource(url, cap=0)
    except (ModelkitError, OSError):
        return 0
    try:
        return max(src.size, 0)
    finally:
        src.close()


@contextmanager
def local_copy(url: str, target: str, on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """``url`` downloaded whole into a private temp folder in ``target``'s folder; yields its path.

    Raises:
        RemoteError, InputNotFoundError, MissingExtraError: as for any remote read.
        OutputWriteError: no room for it (checked once the length is known).
    """
    from .source import RemoteSource

    require(url)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(os.path.join(folder, remote_name(url)), tempfiles.writer_token())
    os.mkdir(tmp)
    try:
        local = os.path.join(tmp, remote_name(url))
        src = RemoteSource(url, spool=local, cap=sys.maxsize, on_bytes=on_bytes)
        try:
            if src.fd < 0:  # ranged so far: now the whole body, checked against the first answer
                ensure_room(local, src.size)
                src.materialize()
        finally:
            src.close()
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_on_copy(url: str, target: str, fn: Callable[[str], R], progress: Callable[[str, int], Any] | None) -> R:
    """``fn(local copy of url)``, its result's ``source`` set back to ``url`` and any error naming the
    copy made to name ``url`` instead."""
    on_bytes = None if progress is None else (lambda n: progress(DOWNLOAD, n))
    with local_copy(url, target, on_bytes) as local:
        try:
            res = fn(local)
        except ModelkitError as exc:
            if exc.path is not None and exc.path.startswith(local):
                exc.path = url + exc.path[len(local):]
                exc.args = (exc.message,)
            raise
    return dataclasses.replace(res, source=url) if dataclasses.is_dataclass(res) else res  # type: ignore[type-var]
