"""Opening a model file behind the scanner: what ``modelkit.open_model`` and every command use.

The readers in ``modelkit.formats`` never run code from a file, and they refuse what the
allow-list refuses. The scanner looks further: every container reading torch could take, every
pickle a loader could reach, nested files. Reading a pickle-based file here first asks the scan
(the same answer ``modelkit scan`` gives), so that no reader accepts a file the scan calls
unsafe: "scan says safe" and "safe load succeeds" cannot drift apart. A safetensors file is a
header and raw bytes; its reader validates it completely and checks it is not also a pickle.
"""

from __future__ import annotations

import os

from .errors import UnsafeFileError
from .formats import open_model as _open_raw
from .model import ModelFile, Source
from .remote import is_remote


def open_model(path: str | os.PathLike[str], *, ignore_scan: bool = False) -> ModelFile:
    """Open a model file with the reader its content calls for, after the scan allows it.

    Args:
        path: a ``.safetensors``, ``.ckpt``/``.pt``/``.pth``/``.bin`` (zip or legacy), plain
            pickle, ``.npy`` or ``.npz`` file. The extension is ignored.
        ignore_scan: read a file the scan calls unsafe anyway (``--ignore-scan``): still only
            through the allow-list, never running anything.

    Returns:
        A ``ModelFile`` (a context manager that owns an open file descriptor).

    Raises:
        UnsafeFileError: the scan calls the file unsafe, or the reader refuses a global.
        FormatError: the file is corrupt, truncated or not a model file.
        NotAFileError, InputNotFoundError: the path is a folder or missing.

    Example:
        >>> with modelkit.open_model("v1-5-pruned.ckpt") as mf:  # doctest: +SKIP
        ...     print(len(mf), mf.container)
    """
    p = os.fspath(path)
    # The reader runs nothing either; its own refusal, when it has one, is the more precise.
    mf = _open_raw(p, allow_hidden_pickles=ignore_scan)
    if not ignore_scan and mf.container != "safetensors":
        try:
            refuse_unsafe(p, mf.source if is_remote(p) else None)
        except BaseException:
            mf.close()
            raise
    return mf


def refuse_unsafe(path: str, source: Source | None = None) -> None:
    """Raise ``UnsafeFileError`` naming the first unsafe finding when the scan calls ``path`` unsafe.

    Args:
        source: the remote source a reader already opened for ``path`` (its fetched bytes are reused).

    Raises:
        UnsafeFileError: the scan's verdict is ``unsafe``.
    """
    from .scan.engine import scan_file

    report = scan_file(path, source=source)
    if report.verdict != "unsafe":
        return
    first = next(f for f in report.findings if f.verdict == "unsafe")
    where = f" in {first.member}" if first.member else ""
    at = f" at byte {first.offset}" if first.offset is not None else ""
    raise UnsafeFileError(path, f"refused to load: the scan found it unsafe{where}{at}: {first.message}",
                          global_name=first.global_name)
