"""Input walking, output naming, atomic writes and the ``--force`` policy."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

from .errors import InputNotFoundError, ModelkitError, OutputExistsError, OutputWriteError, UsageError

#: Extensions a folder walk picks up (a file named on the command line is always taken).
MODEL_EXTENSIONS = (
    ".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".npy", ".npz", ".optim",
)


def is_model_name(name: str) -> bool:
    return name.lower().endswith(MODEL_EXTENSIONS)


def iter_inputs(
    paths: Iterable[str | os.PathLike[str]], on_empty: Callable[[str], None] | None = None
) -> Iterator[str]:
    """Yield files: each path given, or the model files under each folder, sorted.

    Folders are walked without following symlinks, so a link cannot lead the walk outside the
    tree; hidden files and folders are skipped.

    Args:
        on_empty: called with each folder that holds no model file (so a command can say so
            rather than do nothing silently).

    Raises:
        InputNotFoundError: a path does not exist.
    """
    for raw in paths:
        p = os.fspath(raw)
        if os.path.isdir(p):
            found = False
            for full in _walk(p):
                found = True
                yield full
            if not found and on_empty is not None:
                on_empty(p)
        elif os.path.lexists(p):
            yield p
        else:
            raise InputNotFoundError(p, "no such file or folder")


def empty_folder_warning(folder: str) -> str:
    """The warning for a folder that holds no model file."""
    return (f"{folder}: no model files in this folder (looked for {', '.join(MODEL_EXTENSIONS)}; "
            "hidden files and symlinks are skipped)")


def _walk(p: str) -> Iterator[str]:
    for root, dirs, files in os.walk(p, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if name.startswith(".") or not is_model_name(name) or os.path.islink(full):
                continue
            yield full


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text file atomically (temp file in the same folder, fsync, rename).

    Raises:
        OutputWriteError: the folder is missing or not writable, the target is a folder, the disk is full.
    """
    import tempfile

    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise OutputWriteError(target, "is a folder", "Choose an output file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".modelkit-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputWriteError(target, f"cannot create a file in {folder} ({exc.strerror or exc})",
                               "Choose a folder you can write to") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, ModelkitError):
            raise OutputWriteError(target, f"could not be written ({exc.strerror or exc})") from None
        raise


# --- Output naming -----------------------------------------------------------------------------

OUTPUT_SUFFIX = ".safetensors"

#: Files A1111 and ComfyUI show beside a model, named ``<stem><suffix>``.
SIDECAR_SUFFIXES = (".preview.png", ".json", ".civitai.info", ".txt")


def stem(path: str | os.PathLike[str]) -> str:
    """The file name without its last extension: ``x.vae.pt`` -> ``x.vae``."""
    name = os.path.basename(os.fspath(path))
    root, ext = os.path.splitext(name)
    return root if ext else name


def output_name(src: str | os.PathLike[str], tag: str = "") -> str:
    """The default output file name: ``x.vae.pt`` -> ``x.vae.safetensors``; ``tag`` goes before it.

    Example:
        >>> output_name("models/x.vae.pt"), output_name("m.ckpt", ".pruned")
        ('x.vae.safetensors', 'm.pruned.safetensors')
    """
    return stem(src) + tag + OUTPUT_SUFFIX


def plan_outputs(
    inputs: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    tag: str = "",
    on_empty: Callable[[str], None] | None = None,
) -> list[tuple[str, str]]:
    """Pair each input file with its output path.

    A file goes to ``out`` if given (one input file only), else to ``out_dir`` or beside itself,
    under ``output_name``. A folder's files go to the same relative places under ``out_dir``
    (``out`` is taken as ``out_dir`` for a single folder), or beside themselves. Folders are
    walked as ``iter_inputs`` walks them (``on_empty`` as there).

    Raises:
        InputNotFoundError: an input does not exist.
        UsageError: ``out`` with several inputs or together with ``out_dir``.
    """
    given = [os.fspath(p) for p in inputs]
    if out is not None and out_dir is not None:
        raise UsageError(None, "give either an output file or --out-dir, not both")
    if out is not None and len(given) == 1 and os.path.isdir(given[0]):
        out, out_dir = None, out
    if out is not None and len(given) != 1:
        raise UsageError(None, f"one output name for {len(given)} inputs", "Use --out-dir for several inputs")
    pairs: list[tuple[str, str]] = []
    for g in given:
        if os.path.isdir(g):
            for f in iter_inputs([g], on_empty):
                rel = os.path.relpath(os.path.dirname(f), g)
                base = os.path.join(os.fspath(out_dir), rel) if out_dir is not None else os.path.dirname(f)
                pairs.append((f, os.path.normpath(os.path.join(base, output_name(f, tag)))))
            continue
        for f in iter_inputs([g]):
            if out is not None:
                target = os.fspath(out)
            else:
                folder = os.fspath(out_dir) if out_dir is not None else os.path.dirname(f)
                target = os.path.join(folder, output_name(f, tag))
            pairs.append((f, target))
    return pairs


def sidecars(src: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The sidecar files beside ``src`` and where each goes beside ``target`` (same folder -> skipped)."""
    s = os.fspath(src)
    t = os.fspath(target)
    found = []
    src_stem = os.path.join(os.path.dirname(s), stem(s))
    out_stem = os.path.join(os.path.dirname(t), stem(t))
    for suffix in SIDECAR_SUFFIXES:
        a, b = src_stem + suffix, out_stem + suffix
        if os.path.isfile(a) and not os.path.islink(a) and os.path.abspath(a) != os.path.abspath(b):
            found.append((a, b))
    return found


# --- Atomic output -----------------------------------------------------------------------------

def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (the same path resolved, or the same inode)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def require_safetensors_name(target: str | os.PathLike[str]) -> str:
    """Refuse an output name that does not end in ``.safetensors``: modelkit writes nothing else,
    and A1111, ComfyUI and kohya pick the loader by extension (a ``.ckpt`` name would send
    safetensors bytes to ``torch.load``)."""
    t = os.fspath(target)
    if not t.lower().endswith(".safetensors"):
        raise UsageError(t, "is not a .safetensors name, and modelkit writes only safetensors",
                         "Name the output *.safetensors")
    return t


def check_output(
    target: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> str:
    """Refuse an output that is an input or that exists without ``force``; return it as a string.

    Raises:
        OutputExistsError: it exists and ``force`` is false, or it is one of ``inputs`` (always).
    """
    t = os.fspath(target)
    for i in inputs:
        if same_file(t, os.fspath(i)):
            raise OutputExistsError(t, "is the input file; modelkit never writes onto its input",
                                    "Choose another output name or --out-dir")
    if os.path.lexists(t):
        if not force:
            raise OutputExistsError(t, "already exists")
        if os.path.isdir(t):
            raise OutputExistsError(t, "is a folder", "Choose an output file name")
    return t


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``KeyboardInterrupt`` while inside, so cleanup runs.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Iterator[int]:
    """Write ``target`` all at once or not at all; yields a file descriptor open for writing.

    The data goes to a temp file created exclusively in the target's folder (mode 0666 less the
    umask, as any new file), which is fsynced, then renamed onto the target, then the folder is
    fsynced. On any error, signal (SIGTERM/SIGHUP) or Ctrl-C the temp file is removed and the
    target is left as it was. Without ``force`` an existing target is never replaced, even one
    that appears while writing.

    Raises:
        OutputExistsError: see ``check_output``.
        OutputWriteError: the file system refused (full disk, permissions ...).
    """
    t = check_output(target, force=force, inputs=inputs)
    folder = os.path.dirname(os.path.abspath(t))
    tmp = os.path.join(folder, f".{os.path.basename(t)}.{secrets.token_hex(4)}.modelkit-tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    with signals_raise():
        try:
            fd = os.open(tmp, flags, 0o666)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise OutputWriteError(t, f"cannot create a file in {folder} ({exc.strerror})", None if full else
                                   "Choose a folder you can write to; the input was not changed") from None
        try:
            try:
                yield fd
                os.fsync(fd)
            finally:
                os.close(fd)
            _publish(tmp, t, force)
            _fsync_dir(folder)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, ModelkitError):
                raise OutputWriteError(t, f"could not be written ({exc.strerror or exc})") from exc
            raise


def _publish(tmp: str, target: str, force: bool) -> None:
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if the target appeared meanwhile: never a silent overwrite
    except FileExistsError:
        raise OutputExistsError(target, "appeared while modelkit was writing it") from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(target):
            raise OutputExistsError(target, "appeared while modelkit was writing it") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _fsync_dir(folder: str) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(dfd)


def copy_file_atomic(src: str, target: str, *, force: bool = False) -> None:
    """Copy a small file (a sidecar) with ``atomic_output``."""
    with atomic_output(target, force=force, inputs=[src]) as fd, open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            view = memoryview(chunk)
            while len(view):
                view = view[os.write(fd, view) :]


def ensure_room(target: str | os.PathLike[str], size: int) -> None:
    """Create the target's folder and check it has ``size`` bytes free, before any writing.

    Raises:
        OutputWriteError: the folder cannot be used, or it has too little space.
    """
    import shutil

    t = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(t))
    try:
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except (FileExistsError, NotADirectoryError):
        raise OutputWriteError(t, f"cannot use {folder} as its folder: a file is in the way",
                               "Choose another output folder") from None
    except OSError as exc:
        raise OutputWriteError(t, f"cannot use the folder {folder} ({exc.strerror or exc})",
                               "Choose a folder you can write to; the input was not changed") from None
    if free < size:
        raise OutputWriteError(t, f"needs {size:,} bytes but {folder} has {free:,} free")
