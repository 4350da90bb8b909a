"""Container readers. Each returns a ``ModelFile``; none executes code from the file."""

from __future__ import annotations

import os

from ..errors import FormatError, ModelkitError, UnsupportedFormatError
from ..model import ModelFile, Source
from ..remote import is_remote
from .sniff import sniff


def open_model(path: str | os.PathLike[str], *, allow_hidden_pickles: bool = False) -> ModelFile:
    """Open a model file with the reader its content calls for.

    Args:
        path: a ``.safetensors``, ``.ckpt``/``.pt``/``.pth``/``.bin`` (zip or legacy), plain
            pickle, ``.npy`` or ``.npz`` file. The extension is ignored.

    Returns:
        A ``ModelFile`` (a context manager that owns an open file descriptor).

    Raises:
        UnsafeFileError: the file names a global outside the allow-list.
        FormatError: the file is corrupt, truncated or not a model file.
        NotAFileError, InputNotFoundError: the path is a folder or missing.

    Example:
        >>> with open_model("v1-5-pruned.ckpt") as mf:  # doctest: +SKIP
        ...     print(len(mf), mf.container)
    """
    p = os.fspath(path)
    src: Source
    if is_remote(p):
        src, kind = _open_remote(p)
    else:
        kind = sniff(p)
        src = Source(p)
    try:
        return _dispatch(p, kind, src, allow_hidden_pickles)
    except ModelkitError:
        src.close()
        raise
    except (OSError, MemoryError, RecursionError, OverflowError) as exc:
        src.close()
        raise FormatError(p, f"could not be read ({type(exc).__name__}: {exc})") from None
    except BaseException:
        src.close()
        raise


def _open_remote(url: str) -> tuple[Source, str]:
    """A remote file read by ranges (safetensors, zip, GGUF) or downloaded whole (the other containers)."""
    from ..remote.source import RemoteSource
    from .sniff import check_kind, sniff_bytes

    src = RemoteSource(url)
    try:
        kind = check_kind(url, sniff_bytes(src.head[:512], src.size))
        if kind not in ("safetensors", "zip", "gguf"):
            src.materialize()
    except BaseException:
        src.close()
        raise
    return src, kind


def _dispatch(p: str, kind: str, src: Source, allow_hidden: bool = False) -> ModelFile:
    if kind == "safetensors":
        from .safetensors_file import read_safetensors

        return read_safetensors(p, src)
    if kind == "zip":
        from .torch_zip import read_torch_zip
        from .zipdir import read_directory

        zd = read_directory(p, src)
        if zd.entries and all(e.name.endswith(".npy") for e in zd.entries):
            from .numpy_file import read_npz

            return read_npz(p, src, zd)
        return read_torch_zip(p, src, zd, allow_hidden=allow_hidden)
    if kind == "torch-legacy":
        from .torch_legacy import read_torch_legacy

        return read_torch_legacy(p, src)
    if kind == "pickle":
        from .pickle_file import read_pickle

        return read_pickle(p, src)
    if kind == "npy":
        from .numpy_file import read_npy

        return read_npy(p, src)
    if kind == "gguf":
        from .gguf_file import read_gguf

        return read_gguf(p, src)
    if kind == "tar":
        raise UnsupportedFormatError(p, "this is a tar-format torch file (torch < 0.4), which modelkit cannot read yet")
    raise UnsupportedFormatError(p, f"unknown container {kind}")


__all__ = ["ModelFile", "open_model", "sniff"]
