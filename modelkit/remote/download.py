"""Remote inputs of ``convert`` and ``prune``: the file is downloaded whole, once, into a private temp
folder beside the output (a modelkit temp name, so an abandoned one is found and swept like any
other; readable by its owner only), under its own name; the local command then runs on that copy
exactly as on a downloaded file (scan first, then the allow-list reader), and the folder goes when the
command ends, however it ends.

The download is checked as every remote read is: the length the server gave, the body's length, the
same ``ETag``/``Last-Modified`` as the first answer; anything else fails closed (``RemoteError``),
and nothing is written. There is no size cap: the user asked for the whole file. A problem of the
output's folder (a file in the way, no permission, no room) is an ``OutputWriteError`` naming the
output; anything wrong with the file itself names the URL, never the temp copy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from .. import portable, tempfiles
from ..errors import ModelkitError, OutputWriteError
from ..paths import MAX_PATH, ensure_room, temp_path, windows_name_problem
from . import parse_hf, require

R = TypeVar("R")
#: The ``progress`` name the download's bytes are reported under.
DOWNLOAD = "(download)"
#: The longest remote file name kept, in bytes (NAME_MAX is 255 on every common file system).
NAME_BYTES = 160


def remote_name(url: str) -> str:
    """The file name a URL names (its path's last part, unquoted), made safe as a local name on any OS:
    separators and characters Windows refuses become ``_``, a device name gets a ``_`` in front, a long
    name is cut (keeping its extension) to ``NAME_BYTES`` bytes.

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
    if name and windows_name_problem(name):  # a device name (NUL, COM1.ckpt ...): the rest is already safe
        name = "_" + name
    if len(os.fsencode(name)) > NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        keep = dot + ext if dot and len(os.fsencode(ext)) <= 16 else ""
        stem = stem if keep else name
        while stem and len(os.fsencode(stem + "~" + keep)) > NAME_BYTES:
            stem = stem[:-1]
        name = stem + "~" + keep
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


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    out = []
    while folder and not os.path.lexists(folder):
        out.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return out


def run_on_copy(url: str, target: str, fn: Callable[[str], R], progress: Callable[[str, int], Any] | None) -> R:
    """``fn(path of a local copy of url)``, its result's ``source`` set back to ``url``.

    Raises:
        RemoteError, InputNotFoundError, MissingExtraError: as for any remote read (naming ``url``).
        OutputWriteError: the output's folder cannot take the download (naming ``target``).
        Whatever ``fn`` raises, a path of the copy in it made to name ``url``.
    """
    from .source import RemoteSource

    require(url)
    folder = os.path.dirname(os.path.abspath(target))
    made = _missing_folders(folder)
    name = remote_name(url)
    windows = portable.WINDOWS_RULES
    tmp = temp_path(os.path.join(folder, name), tempfiles.writer_token(),
                    max_path=MAX_PATH - len(name) - 1 if windows else None)
    local = os.path.join(tmp, name)
    on_bytes = None if progress is None else (lambda n: progress(DOWNLOAD, n))
    done = False
    try:
        ensure_room(target, 0)  # the folder: created, and usable (one line if not)
        try:
            os.mkdir(tmp, 0o700)
        except OSError as exc:
            raise OutputWriteError(target, f"cannot make a temporary folder for the download in {folder} "
                                           f"({exc.strerror or exc})", "Choose a folder you can write to") from None
        src = RemoteSource(url, spool=local, cap=sys.maxsize, on_bytes=on_bytes)
        try:
            if src.fd < 0:  # ranged so far: now the whole body, checked against the first answer
                src.materialize()
        finally:
            src.close()
        try:
            res = fn(local)
        except ModelkitError as exc:
            if exc.path is not None and exc.path.startswith(local):
                exc.path = url + exc.path[len(local):]
                exc.args = (exc.message,)
            raise
        done = True
    except OutputWriteError as exc:
        if exc.path is not None and exc.path.startswith(tmp):  # the download's own file: the output's folder
            exc.path = target
            exc.args = (exc.message,)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for d in made:  # folders this run created for an output it did not write
                try:
                    os.rmdir(d)
                except OSError:
                    break
    if os.path.lexists(tmp):
        warning = f"could not remove the downloaded copy {tmp}; `modelkit clean` removes it later"
        res = dataclasses.replace(res, warnings=(*getattr(res, "warnings", ()), warning))  # type: ignore[type-var]
    return dataclasses.replace(res, source=url)  # type: ignore[type-var]
