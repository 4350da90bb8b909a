"""Input walking and output naming."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from .errors import InputNotFoundError

#: Extensions a folder walk picks up (a file named on the command line is always taken).
MODEL_EXTENSIONS = (
    ".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".npy", ".npz", ".optim",
)


def is_model_name(name: str) -> bool:
    return name.lower().endswith(MODEL_EXTENSIONS)


def iter_inputs(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Yield files: each path given, or the model files under each folder, sorted.

    Folders are walked without following symlinks, so a link cannot lead the walk outside the
    tree; hidden files and folders are skipped.

    Raises:
        InputNotFoundError: a path does not exist.
    """
    for raw in paths:
        p = os.fspath(raw)
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if name.startswith(".") or not is_model_name(name) or os.path.islink(full):
                        continue
                    yield full
        elif os.path.lexists(p):
            yield p
        else:
            raise InputNotFoundError(p, "no such file or folder")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text file atomically (temp file in the same folder, fsync, rename)."""
    import tempfile

    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".modelkit-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
