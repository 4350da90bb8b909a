"""Container detection from content (magic bytes), never from the file name."""

from __future__ import annotations

import os
import stat
import struct

from ..errors import InputNotFoundError, NotAFileError, TruncatedFileError, UnsupportedFormatError
from .numpy_file import NPY_MAGIC
from .pickle_vm import looks_like_pickle
from .torch_legacy import is_legacy
from .zipdir import is_zip

HEAD = 512

#: Compressed wrappers the scanner opens (bounded) and scans inside; readers refuse them.
WRAPPERS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))

_OTHER = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF (WebP/WAV) file"),
    (b"%PDF", "a PDF document"),
    (b"7z\xbc\xaf", "a 7-zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x08\x01\x12", "an ONNX/protobuf file"),
    (b"<!DOCTYPE html", "an HTML page (a failed download?)"),
    (b"<html", "an HTML page (a failed download?)"),
)


def sniff_bytes(head: bytes, size: int) -> str:
    """The container kind for a file that starts with ``head``.

    Returns:
        ``safetensors``, ``zip`` (the reader tells torch from npz), ``torch-legacy``,
        ``pickle``, ``npy``, ``tar``, ``gguf``, ``wrapped:<gzip|bzip2|xz>`` or ``unknown:<what it looks like>``.
    """
    for magic, fmt in WRAPPERS:
        if head.startswith(magic):
            return f"wrapped:{fmt}"
    if is_zip(head):
        return "zip"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if is_legacy(head):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n > 1:
            return "safetensors"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"GGUF"):  # the reader says what is wrong with a short one
        return "gguf"
    if looks_like_pickle(head):
        return "pickle"
    for magic, what in _OTHER:
        if head.startswith(magic):
            return f"unknown:{what}"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "unknown:a text file"
    return "unknown:not a model file"


def check_file(path: str | os.PathLike[str]) -> os.stat_result:
    """Stat an input that must be a regular file; the user-facing errors for anything else.

    A FIFO, socket or device (``/dev/zero``, ``/dev/urandom``) is refused before it is opened, so a
    read can never block forever or run without end.

    Raises:
        InputNotFoundError: the path does not exist or cannot be reached (a symlink loop, ...).
        NotAFileError: it is a folder, FIFO, socket or device.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputNotFoundError(p, "no such file") from None
    except OSError as exc:
        raise InputNotFoundError(p, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise NotAFileError(p, "is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        what = _SPECIAL.get(stat.S_IFMT(st.st_mode), "a special file")
        raise NotAFileError(p, f"is {what}, not a regular file", "Pass a model file saved on disk")
    return st


_SPECIAL = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device"}


def sniff(path: str | os.PathLike[str], wrappers: bool = False, unknown_ok: bool = False) -> str:
    """Sniff a path; raises the user-facing errors for missing files, folders and empty files.

    Args:
        wrappers: return ``wrapped:<fmt>`` for gzip/bzip2/xz (the scanner opens them); by
            default they are reported as unsupported, since no model loader reads them.
        unknown_ok: return ``unknown:<what it looks like>`` instead of raising (the scanner
            still probes such a file, since torch.load unpickles any non-zip file).
    """
    p = os.fspath(path)
    st = check_file(p)
    if st.st_size == 0:
        raise TruncatedFileError(p, "the file is empty (0 bytes)")
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD)
    except OSError as exc:
        raise InputNotFoundError(p, f"cannot be read ({exc.strerror or exc})") from None
    return check_kind(p, sniff_bytes(head, st.st_size), wrappers, unknown_ok)


def check_kind(p: str, kind: str, wrappers: bool = False, unknown_ok: bool = False) -> str:
    """``kind``, or the user-facing error for a compressed or unknown file (see ``sniff``)."""
    if kind.startswith("wrapped:") and not wrappers:
        raise UnsupportedFormatError(p, f"this is a {kind[8:]}-compressed file, not a model file; decompress it first")
    if kind.startswith("unknown:") and not unknown_ok:
        what = kind[8:]
        raise UnsupportedFormatError(p, "this is not a model file: " + (
            "its first bytes match no known container" if what == "not a model file" else f"it looks like {what}"))
    return kind
