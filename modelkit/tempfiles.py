"""Temp files an interrupted modelkit left behind: how they are named, when one is abandoned,
and how they are removed.

Every output goes to ``.NAME.TOKEN.modelkit-tmp`` in its folder first (``paths.temp_path``). A
``kill -9``, a crash or a power cut leaves that file behind, often hundreds of MB. TOKEN names its
writer: ``RAND-pPID-hHOST`` (8 random hex digits, the writer's pid, 4 hex digits of a hash of its
host name), e.g. ``.m.safetensors.0a1b2c3d-p4242-h9f3c.modelkit-tmp``. ``is_stale`` decides from
that name, the process table and the file's age whether the writer is gone. The first write into
a folder removes the stale temps there (``sweep_folder``), ``scan`` and ``inspect`` of a folder
name them, and ``modelkit clean`` (``find_temps`` + ``clean``) lists and removes them.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: A temp of a writer on this host whose pid is not running is stale once it is this old (seconds):
#: a margin against a clock that jumps and a pid namespace (a container) sharing the folder.
DEAD_WRITER_AGE = 60.0
#: A temp whose writer cannot be checked (another host, a name from an earlier modelkit without a
#: pid, a process table that cannot be read) is stale once its last write is this old (seconds).
UNKNOWN_WRITER_AGE = 3600.0

_SUFFIX = ".modelkit-tmp"
#: ``.NAME.RAND-pPID-hHOST.modelkit-tmp`` (NAME may be cut to nothing: ``.RAND-pPID-hHOST.modelkit-tmp``).
_NEW = re.compile(r"^\.(?:.*\.)?[0-9a-f]{8}-p(?P<pid>[0-9]{1,10})-h(?P<host>[0-9a-f]{4})\.modelkit-tmp$", re.S)
#: Earlier modelkits: ``.NAME.RAND.modelkit-tmp`` for outputs, ``.modelkit-XXXXXXXX.tmp`` (mkstemp) for small text files.
_OLD = re.compile(r"^(?:\.(?:.*\.)?[0-9a-f]{8}\.modelkit-tmp|\.modelkit-[a-z0-9_]{8}\.tmp)$", re.S)


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """4 hex digits of a hash of this host's name (so a temp on a shared folder is not judged by
    another machine's process table)."""
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:4]


def writer_token() -> str:
    """A fresh TOKEN for a temp name: ``RAND-pPID-hHOST`` (no ``:``, valid on Windows)."""
    return f"{os.urandom(4).hex()}-p{os.getpid()}-h{host_tag()}"


def is_temp_name(name: str) -> bool:
    """Whether a file name (one component) is a modelkit temp name, of this version or an older one."""
    return bool(_NEW.match(name) or _OLD.match(name))


def writer_pid(name: str) -> int | None:
    """The writer's pid in a temp name of this host, or None (an old name, another host, not a temp)."""
    m = _NEW.match(name)
    return int(m["pid"]) if m and m["host"] == host_tag() else None


def process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine: True, False, or None when it cannot be told.

    POSIX: ``os.kill(pid, 0)`` (a process of another user answers EPERM: alive). Windows:
    ``OpenProcess`` + ``GetExitCodeProcess`` through ctypes.
    """
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


if sys.platform == "win32":
    def _windows_alive(pid: int) -> bool | None:
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            err = ctypes.get_last_error()
            return False if err == 87 else True if err == 5 else None  # invalid parameter / access denied
        try:
            code = wintypes.DWORD()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return None
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)


def is_stale(path: str | os.PathLike[str], now: float | None = None) -> bool:
    """Whether ``path`` is a modelkit temp file whose writer is gone, so it can be removed.

    True only for a regular file (not a symlink) with a modelkit temp name (``is_temp_name``) and:

    - a name of this host with a pid: that pid runs no process here and the file is at least
      ``DEAD_WRITER_AGE`` seconds old (its last write);
    - any other temp name (another host, one from an earlier modelkit, without a pid) or a pid that
      cannot be checked: the file is at least ``UNKNOWN_WRITER_AGE`` seconds (1 hour) old.

    A temp whose pid runs is never stale, even when that pid was reused by another program after
    the writer died: such a file is kept (and ``modelkit clean`` says which pid holds it).

    Args:
        now: the time to judge ages by (default ``time.time()``).
    """
    p = os.fspath(path)
    st = _regular_temp(p)
    return st is not None and _stale(os.path.basename(p), st, now)


def _regular_temp(path: str) -> os.stat_result | None:
    """The stat of ``path`` when it is a regular file with a modelkit temp name, else None."""
    import stat

    if not is_temp_name(os.path.basename(path)):
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _temp_folder(path: str) -> tuple[int, float] | None:
    """(bytes inside, newest mtime inside) of a folder with a modelkit temp name (the temp sibling a
    folder output is built in: a diffusers folder, PEFT adapters, a DreamBooth pipeline), else None.
    Its last write is the newest mtime of anything in it: files are written deep inside."""
    import stat

    if not is_temp_name(os.path.basename(path)):
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    size, newest = 0, st.st_mtime
    for root, dirs, files in os.walk(path, followlinks=False):
        for n in (*dirs, *files):
            try:
                e = os.lstat(os.path.join(root, n))
            except OSError:
                continue
            newest = max(newest, e.st_mtime)
            if stat.S_ISREG(e.st_mode):
                size += e.st_size
    return size, newest


def _stale(name: str, st: os.stat_result, now: float | None) -> bool:
    return _stale_since(name, st.st_mtime, now)


def _stale_since(name: str, mtime: float, now: float | None) -> bool:
    age = (time.time() if now is None else now) - mtime
    pid = writer_pid(name)
    alive = process_alive(pid) if pid is not None else None
    if alive:
        return False
    return age >= (DEAD_WRITER_AGE if alive is False else UNKNOWN_WRITER_AGE)


@dataclass(frozen=True)
class TempFile:
    """One modelkit temp file: where, how big, its writer's pid (None when unknown) and whether it
    is stale (``is_stale``)."""

    path: str
    size: int
    pid: int | None
    stale: bool
    #: a temp folder (a folder output being built), removed with everything in it
    folder: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "pid": self.pid, "stale": self.stale, "folder": self.folder}


def temp_file(path: str) -> TempFile | None:
    """The ``TempFile`` at ``path``, or None when it is not a modelkit temp file (or is gone)."""
    st = _regular_temp(path)
    if st is None:
        return None
    name = os.path.basename(path)
    return TempFile(path, st.st_size, writer_pid(name), _stale(name, st, None))


def find_temps(folders: Iterable[str | os.PathLike[str]], recursive: bool = True) -> Iterator[TempFile]:
    """Every modelkit temp file in ``folders`` (and below, unless not ``recursive``), sorted per
    folder; hidden folders are walked too, symlinks are not followed."""
    for folder in folders:
        for root, dirs, files in os.walk(os.fspath(folder), followlinks=False):
            dirs.sort()
            for name in [d for d in dirs if is_temp_name(d)]:
                dirs.remove(name)  # a temp folder is one temp: never walked into
                found = _temp_folder(os.path.join(root, name))
                if found is not None:
                    size, newest = found
                    yield TempFile(os.path.join(root, name), size, writer_pid(name), _stale_since(name, newest, None),
                                   folder=True)
            if not recursive:
                dirs.clear()
            for name in sorted(files):
                t = temp_file(os.path.join(root, name)) if is_temp_name(name) else None
                if t is not None:
                    yield t


@dataclass(frozen=True)
class CleanResult:
    """What ``clean`` found: the stale temps removed (or, with ``dry_run``, to remove), the temps
    kept because their writer may still run, and those that could not be removed (with why)."""

    removed: tuple[TempFile, ...]
    kept: tuple[TempFile, ...]
    failed: tuple[tuple[TempFile, str], ...]
    dry_run: bool

    @property
    def removed_bytes(self) -> int:
        return sum(t.size for t in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "modelkit.clean/1", "dry_run": self.dry_run,
                "removed": [t.to_dict() for t in self.removed], "removed_bytes": self.removed_bytes,
                "kept": [t.to_dict() for t in self.kept],
                "failed": [{**t.to_dict(), "problem": why} for t, why in self.failed]}


def clean(folders: Iterable[str | os.PathLike[str]], *, dry_run: bool = False, recursive: bool = True) -> CleanResult:
    """Remove the abandoned modelkit temp files, and temp folders (a folder output's temp sibling),
    in ``folders`` (see ``is_stale``); nothing else.

    Example:
        >>> clean(["models/"], dry_run=True).removed   # doctest: +SKIP
        (TempFile(path='models/.m.safetensors.0a1b2c3d-p4242-h9f3c.modelkit-tmp', size=..., ...),)

    Args:
        dry_run: only say what would be removed.
        recursive: also the folders below (never through a symlink).

    Returns:
        The ``CleanResult``; a file that could not be removed is in ``failed``, never raised.
    """
    removed: list[TempFile] = []
    kept: list[TempFile] = []
    failed: list[tuple[TempFile, str]] = []
    for t in find_temps(folders, recursive):
        if not t.stale:
            kept.append(t)
            continue
        if not dry_run:
            try:
                if t.folder:
                    import shutil

                    shutil.rmtree(t.path)  # never follows a symlink inside
                else:
                    os.unlink(t.path)
            except FileNotFoundError:
                continue  # removed meanwhile (another clean, another sweep)
            except OSError as exc:
                failed.append((t, exc.strerror or str(exc)))
                continue
        removed.append(t)
    return CleanResult(tuple(removed), tuple(kept), tuple(failed), dry_run)


def size_text(n: int) -> str:
    """``1.2 GB``-style size for messages (decimal units, as file managers show)."""
    size = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{n:,} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n:,} bytes"  # pragma: no cover


def removed_message(result: CleanResult, where: str) -> str:
    """The one line a sweep reports: ``FOLDER: removed 2 abandoned temp files (1.2 GB) left by an
    interrupted modelkit``."""
    n = len(result.removed)
    return (f"{where}: removed {n} abandoned temp file{'s' if n != 1 else ''} ({size_text(result.removed_bytes)}) "
            "left by an interrupted modelkit")


def abandoned_warning(path: str, size: int) -> str:
    """The warning ``scan`` and ``inspect`` give for a stale temp file in a folder they walk."""
    return (f"{path}: abandoned modelkit temp file ({size_text(size)}) left by an interrupted write; not read. "
            "Remove it with 'modelkit clean'")


# --- The sweep before a write ------------------------------------------------------------------

_swept: set[str] = set()
_sweep_lock = threading.Lock()
_reporter: Callable[[str], None] | None = None


def report_sweeps_to(fn: Callable[[str], None] | None) -> None:
    """Send the line a sweep reports to ``fn`` (the CLI: a warning on stderr); None: to the
    ``modelkit`` logger, at WARNING."""
    global _reporter
    _reporter = fn


def sweep_folder(folder: str) -> CleanResult | None:
    """Remove the stale temp files in ``folder`` (not below) the first time this process writes
    there, and report them in one line (``report_sweeps_to``). Never raises: a sweep that fails
    leaves the files for ``modelkit clean``.

    Returns:
        What was removed, or None when ``folder`` was swept before by this process.
    """
    key = os.path.normcase(os.path.abspath(folder))
    with _sweep_lock:
        if key in _swept:
            return None
        _swept.add(key)
        try:
            result = clean([folder], recursive=False)
        except OSError:
            return None
    if result.removed:
        if _reporter is None:
            import logging

            logging.getLogger("modelkit").warning("%s", removed_message(result, folder))
        else:
            _reporter(removed_message(result, folder))
    return result
