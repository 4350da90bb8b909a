"""Input walking, output naming, atomic writes and the ``--force`` policy."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from . import portable
from .errors import InputNotFoundError, ModelkitError, OutputExistsError, OutputWriteError, UsageError
from .remote import is_remote

#: Extensions a folder walk picks up (a file named on the command line is always taken).
MODEL_EXTENSIONS = (
    ".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".npy", ".npz", ".optim",
)


def is_model_name(name: str) -> bool:
    return name.lower().endswith(MODEL_EXTENSIONS)


def iter_inputs(
    paths: Iterable[str | os.PathLike[str]], on_empty: Callable[[str], None] | None = None,
    missing_ok: bool = False, on_stale: Callable[[str, int], None] | None = None,
) -> Iterator[str]:
    """Yield files: each path given, or the model files under each folder, sorted.

    Folders are walked without following symlinks, so a link cannot lead the walk outside the
    tree; hidden files and folders are skipped.

    Args:
        on_empty: called with each folder that holds no model file (so a command can say so
            rather than do nothing silently).
        missing_ok: yield a path that does not exist as it was given, so a command that handles
            many files reports it as one failed file (its reader raises InputNotFoundError)
            and goes on with the others.
        on_stale: called with the path and size of each abandoned modelkit temp file in a walked
            folder (``tempfiles.is_stale``), which is never yielded, so a command can name it.

    Raises:
        InputNotFoundError: a path does not exist (unless ``missing_ok``).
    """
    for raw in paths:
        p = os.fspath(raw)
        if is_remote(p):
            from .remote import expand, require

            require(p)
            found = False
            for url in expand([p], MODEL_EXTENSIONS):
                found = True
                yield url
            if not found and on_empty is not None:
                on_empty(p)
        elif os.path.isdir(p):
            found = False
            for full in _walk(p, on_stale):
                found = True
                yield full
            if not found and on_empty is not None:
                on_empty(p)
        elif missing_ok or os.path.lexists(p):
            yield p
        else:
            raise InputNotFoundError(p, "no such file or folder")


def empty_folder_warning(folder: str) -> str:
    """The warning for a folder that holds no model file."""
    return (f"{folder}: no model files in this folder (looked for {', '.join(MODEL_EXTENSIONS)}; "
            "hidden files and symlinks are skipped)")


def _walk(p: str, on_stale: Callable[[str, int], None] | None = None) -> Iterator[str]:
    for root, dirs, files in os.walk(p, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if on_stale is not None and name.endswith((".modelkit-tmp", ".tmp")):
                from .tempfiles import temp_file

                t = temp_file(full)
                if t is not None and t.stale:
                    on_stale(full, t.size)
            if name.startswith(".") or not is_model_name(name) or os.path.islink(full):
                continue
            yield full


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text file atomically (temp file in the same folder, fsync, rename).

    Raises:
        OutputWriteError: the folder is missing or not writable, the target is a folder, the disk is full.
    """
    from .tempfiles import sweep_folder, writer_token

    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise OutputWriteError(target, "is a folder", "Choose an output file name")
    refuse_windows_name(target)
    sweep_folder(folder)
    # in the target's folder: os.replace is atomic only within one volume
    tmp = temp_path(target, writer_token(), max_path=MAX_PATH if portable.WINDOWS_RULES else None)
    try:
        fd = portable.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise OutputWriteError(target, f"cannot create a file in {folder} ({exc.strerror or exc})",
                               "Choose a folder you can write to") from None
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_retrying(tmp, target)
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


def text_name(path: str | os.PathLike[str]) -> str:
    """The file name of ``path`` as text for metadata: bytes that are not UTF-8 (a Linux name such
    as ``b"\\xff.ckpt"``, which Python holds as surrogate escapes) become U+FFFD.

    Example:
        >>> text_name(os.fsdecode(b"models/\\xffx.ckpt")) == "\\ufffdx.ckpt"
        True
    """
    p = os.fspath(path)
    if is_remote(p):  # the name a download of it gets
        from .remote.download import remote_name

        return remote_name(p)
    return os.fsencode(os.path.basename(p)).decode("utf-8", "replace")


def output_name(src: str | os.PathLike[str], tag: str = "") -> str:
    """The default output file name: ``x.vae.pt`` -> ``x.vae.safetensors``; ``tag`` goes before it.

    Example:
        >>> output_name("models/x.vae.pt"), output_name("m.ckpt", ".pruned")
        ('x.vae.safetensors', 'm.pruned.safetensors')
    """
    return stem(src) + tag + OUTPUT_SUFFIX


def default_target(src: str, out_dir: str | os.PathLike[str] | None, tag: str = "") -> str:
    """Where the output of ``src`` goes when no name is given: ``output_name`` in ``out_dir``, else beside
    ``src``; for a remote ``src``, named after the remote file, in ``out_dir`` or the current folder."""
    if is_remote(src):
        from .remote.download import remote_name

        return os.path.join(os.fspath(out_dir) if out_dir is not None else "", output_name(remote_name(src), tag))
    trimmed = src.rstrip("/\\")  # a folder typed with a trailing separator (tab completion) is named, not entered
    if trimmed and not trimmed.endswith(":"):
        src = trimmed
    folder = os.fspath(out_dir) if out_dir is not None else os.path.dirname(src)
    return os.path.join(folder, output_name(src, tag))


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
                target = default_target(f, out_dir, tag)
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
        raise UsageError(t, "is not a .safetensors name, and modelkit writes safetensors (GGUF only with --to gguf)",
                         "Name the output *.safetensors")
    return t


def check_output(
    target: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> str:
    """Refuse an output that is an input or that exists without ``force``; return it as a string.

    Raises:
        OutputExistsError: it exists and ``force`` is false, or it is one of ``inputs`` (always).
        UsageError: a name Windows cannot hold, on Windows (see ``windows_name_problem``), or a remote input.
    """
    t = os.fspath(target)
    refuse_windows_name(t)
    for i in inputs:
        if is_remote(os.fspath(i)):
            raise UsageError(os.fspath(i), "a remote file is read by scan, inspect, detect and hash, and "
                                           "downloaded by convert and prune; this command takes local inputs",
                             "Download it first (or convert it), then use the copy")
        if same_file(t, os.fspath(i)):
            raise OutputExistsError(t, "is the input file; modelkit never writes onto its input",
                                    "Choose another output name or --out-dir")
    if os.path.lexists(t):
        if not force:
            raise OutputExistsError(t, "already exists")
        if os.path.isdir(t):
            raise OutputExistsError(t, "is a folder", "Choose an output file name")
    return t


#: Names Windows keeps for devices, with or without an extension, in any case.
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"})
#: Characters Windows refuses in a file name (and control characters).
_WINDOWS_BAD_CHARS = frozenset('<>:"/\\|?*') | frozenset(chr(i) for i in range(32))
#: Windows' MAX_PATH: a longer path needs long-path support there.
MAX_PATH = 260
#: The longest file name (one path component), in bytes on POSIX.
NAME_MAX = 255


def windows_name_problem(name: str) -> str | None:
    """Why Windows cannot hold a file named ``name`` (one path component), or None if it can.

    Example:
        >>> windows_name_problem("nul.safetensors")
        'is a device name on Windows (NUL), not a file name'
        >>> windows_name_problem("model.safetensors") is None
        True
    """
    if name != name.rstrip(". "):
        return "ends in a dot or a space, which Windows drops from file names"
    bad = sorted({c for c in name if c in _WINDOWS_BAD_CHARS})
    if bad:
        return f"holds {', '.join(repr(c) for c in bad)}, which Windows does not allow in a file name"
    base = name.split(".", 1)[0].rstrip(" ").upper()
    if base in _WINDOWS_DEVICES:
        return f"is a device name on Windows ({base}), not a file name"
    return None


def refuse_windows_name(target: str) -> None:
    """On Windows (and under ``MODELKIT_PORTABLE``), refuse an output name Windows cannot hold.

    Raises:
        UsageError: see ``windows_name_problem``.
    """
    if not portable.WINDOWS_RULES:
        return
    problem = windows_name_problem(os.path.basename(target))
    if problem is not None:
        raise UsageError(target, problem, "Choose another output name")


def temp_path(target: str, token: str, *, max_path: int | None = None) -> str:
    """Where an output is written before it is renamed onto ``target``: ``.NAME.TOKEN.modelkit-tmp``
    in the target's folder, NAME being the target's name. ``atomic_output`` gives as TOKEN
    ``tempfiles.writer_token()`` (random, the writer's pid and host), so that a temp file a killed
    writer left behind is known as abandoned (``tempfiles.is_stale``).

    Characters Windows refuses become ``_``. A long NAME is cut, ending in ``~``, so that the temp
    name fits in ``NAME_MAX`` bytes and, given ``max_path``, the whole path in fewer than
    ``max_path`` characters (UTF-16 units, as Windows counts).

    Example:
        >>> temp_path("/out/m.safetensors", "0a1b2c3d")
        '/out/.m.safetensors.0a1b2c3d.modelkit-tmp'
    """
    folder = os.path.dirname(os.path.abspath(target))
    name = "".join("_" if c in _WINDOWS_BAD_CHARS else c for c in os.path.basename(target))
    tail = f".{token}.modelkit-tmp"

    def leaf(n: str) -> str:
        return f".{n}{tail}" if n else tail

    def fits(n: str) -> bool:
        if len(os.fsencode(leaf(n))) > NAME_MAX:
            return False
        return max_path is None or len(os.path.join(folder, leaf(n)).encode("utf-16-le", "surrogatepass")) // 2 < max_path

    if fits(name):
        return os.path.join(folder, leaf(name))
    cut = name[:-1]
    while cut and not fits(cut + "~"):
        cut = cut[:-1]
    return os.path.join(folder, leaf(cut + "~" if cut else ""))


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

    A ``kill -9`` or a power cut cannot be caught: the temp file stays, named after its writer's
    pid. So the first write of this process into a folder first removes the temp files there
    whose writer is gone (``tempfiles.sweep_folder``, which reports it in one line).

    Raises:
        OutputExistsError: see ``check_output``.
        OutputWriteError: the file system refused (full disk, permissions ...).
    """
    from .tempfiles import sweep_folder, writer_token

    t = check_output(target, force=force, inputs=inputs)
    folder = os.path.dirname(os.path.abspath(t))
    sweep_folder(folder)
    # The temp file lives in the target's own folder: os.replace (and os.link) work within one
    # volume only, and only there is the rename atomic.
    tmp = temp_path(t, writer_token(), max_path=MAX_PATH if portable.WINDOWS_RULES else None)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with signals_raise():
        try:
            fd = portable.open_fd(tmp, flags, 0o666)
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
        replace_retrying(tmp, target)
        return
    if portable.HARD_LINKS:
        try:
            os.link(tmp, target)  # fails if the target appeared meanwhile: never a silent overwrite
        except FileExistsError:
            raise OutputExistsError(target, "appeared while modelkit was writing it") from None
        except OSError:  # no hard links on this file system (FAT, exFAT, some network shares)
            pass
        else:
            os.unlink(tmp)
            return
    _publish_without_link(tmp, target)


def _publish_without_link(tmp: str, target: str) -> None:
    """Rename ``tmp`` onto ``target`` without ever replacing a file that is not ours.

    Windows' rename fails when the target exists, which is exactly that. A POSIX rename replaces,
    so the name is first claimed by creating an empty file exclusively (``O_EXCL``), which the
    rename then replaces; if the rename fails, that empty file is removed.
    """
    appeared = OutputExistsError(target, "appeared while modelkit was writing it")
    if os.name == "nt":
        try:
            _retrying(os.rename, tmp, target)
        except FileExistsError:
            raise appeared from None
        return
    try:
        os.close(portable.open_fd(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise appeared from None
    try:
        replace_retrying(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


#: Seconds waited before each new try of a replace that another program blocks (Windows).
REPLACE_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8)
#: Windows errors of a replace onto a file in use: access denied, sharing violation.
_IN_USE_WINERRORS = (5, 32)


def held_open(exc: BaseException) -> bool:
    """Whether a failed rename or replace means another program holds a file open (Windows'
    access denied or sharing violation; under ``MODELKIT_PORTABLE`` any ``PermissionError``)."""
    if not isinstance(exc, PermissionError):
        return False
    return getattr(exc, "winerror", None) in _IN_USE_WINERRORS or portable.PORTABLE


def _retrying(fn: Callable[[str, str], None], src: str, dst: str, waits: Iterable[float] | None = None,
              sleep: Callable[[float], None] | None = None) -> None:
    for wait in (*(REPLACE_WAITS if waits is None else waits), None):
        try:
            fn(src, dst)
            return
        except PermissionError as exc:
            if not held_open(exc):
                raise
            if wait is None:
                raise OutputWriteError(
                    dst, "is open in another program (or read-only), so it cannot be replaced",
                    "Close the program that holds it (an app that loaded the model, a file viewer) or clear "
                    "its read-only flag, then run again; the input was not changed") from None
            (time.sleep if sleep is None else sleep)(wait)


def replace_retrying(src: str, dst: str, waits: Iterable[float] | None = None,
                     sleep: Callable[[float], None] | None = None) -> None:
    """``os.replace(src, dst)``, tried again after each wait while another program holds a file
    open (Windows refuses to replace a file in use; an antivirus may hold a new file a moment).

    Args:
        waits: seconds to wait before each new try (default ``REPLACE_WAITS``, about 1.5 s in all).
        sleep: how to wait (default ``time.sleep``).

    Raises:
        OutputWriteError: still held after the last wait; the message names ``dst`` and says to
            close the program that holds it. (The caller removes ``src``.)
        OSError: any other failure, at once.
    """
    _retrying(os.replace, src, dst, waits, sleep)


def _fsync_dir(folder: str) -> None:
    if not portable.FOLDER_FSYNC:
        return  # Windows cannot open a folder to fsync it (nor does it need to)
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
