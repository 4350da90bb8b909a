"""The ``__metadata__`` an output carries: what the input had, what we add, and where it came from.

Keys modelkit writes:

* ``modelkit.source``: the input's file name; ``modelkit.source_sha256``: the sha256 of the whole
  input file (hashed in a background thread while the output is written, then patched into the
  header, which holds a same-length placeholder until then); ``modelkit.version``;
  ``modelkit.changes``: a JSON list of what was changed, in words.
* ``modelspec.*`` (Stability AI's ModelSpec) and kohya's base tags: ``modelkit.ops.modelspec`` owns
  them (the input's own valid ``modelspec.*`` values win unless the output is a new model).
* Non-tensor values a format keeps beside its tensors (``global_step``, ``epoch``, ``name``,
  ``step``, and the structure of a hypernetwork): strings stay as they are, other values are JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .. import __version__, portable
from ..errors import FormatError
from . import hashcache

#: Same length as a sha256 hex digest, so the header can be patched in place.
SHA_PLACEHOLDER = "0" * 64

#: Non-tensor values that become metadata for every kind of file.
COMMON_EXTRAS = ("global_step", "epoch", "name", "step")

#: A1111 textual-inversion fields kept as metadata.
EMBEDDING_EXTRAS = ("sd_checkpoint", "sd_checkpoint_name")

#: A1111 hypernetwork fields needed to rebuild its structure (all JSON in the output).
HYPERNETWORK_EXTRAS = (
    "layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "use_dropout",
    "activate_output", "dropout_structure", "last_layer_dropout", "sd_checkpoint", "sd_checkpoint_name",
)


def as_text(value: Any) -> str:
    """A metadata string: strings unchanged, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def split_extras(extras: Mapping[str, Any], keep: tuple[str, ...] = (), as_json: tuple[str, ...] = ()) -> tuple[
        dict[str, str], dict[str, Any]]:
    """Split non-tensor values into metadata and the rest (which the caller must report).

    Args:
        extras: ``ModelFile.extras``.
        keep: keys kept as metadata (strings as they are, others JSON).
        as_json: keys kept as metadata, always JSON (so a string is quoted).

    Returns:
        (metadata, dropped).
    """
    meta: dict[str, str] = {}
    dropped: dict[str, Any] = {}
    wanted = set(COMMON_EXTRAS) | set(keep)
    for key, value in extras.items():
        if key in as_json:
            meta[key] = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        elif key in wanted and value is not None:
            meta[key] = as_text(value)
        else:
            dropped[key] = value
    return meta, dropped


def provenance(source: str, changes: list[str], sha256: str = SHA_PLACEHOLDER) -> dict[str, str]:
    """The ``modelkit.*`` keys for an output made from ``source``."""
    return {
        "modelkit.source": os.path.basename(source),
        "modelkit.source_sha256": sha256,
        "modelkit.version": __version__,
        "modelkit.changes": json.dumps(changes, ensure_ascii=False),
    }


def combine(existing: Mapping[str, str], *layers: Mapping[str, str], defaults: Mapping[str, str] = {}) -> dict[str, str]:
    """The input's metadata, then each layer over it; ``defaults`` only fill keys still missing."""
    out = dict(existing)
    for layer in layers:
        out.update(layer)
    for k, v in defaults.items():
        out.setdefault(k, v)
    return out


#: The hash of a big file runs in a child process that maps the file instead of reading it: it
#: saves a copy of every byte (on 2 cores a 7.7 GB prune went from 7.2 s to 5.5-6.5 s), and if the
#: file shrinks under the mapping, the SIGBUS ends the child, not modelkit (which then says so).
_CHILD_CODE = """
import hashlib, mmap, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is modelkit's to handle: it stops this child
fd, size, parent, step = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 16 << 20
flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
h, off = hashlib.sha256(), 0
while off < size:
    if os.getppid() != parent:
        sys.exit(3)  # modelkit is gone: nobody waits for this hash
    n = min(step, size - off)
    m = mmap.mmap(fd, n, flags=flags, prot=mmap.PROT_READ, offset=off)
    h.update(m)
    m.close()
    off += n
sys.stdout.write(h.hexdigest())
"""


_WAIT = "Wait until the download or copy has finished, then run again"


def _read_error(path: str, exc: OSError) -> FormatError:
    return FormatError(path, f"could not be read ({exc.strerror or exc})", "Check the disk or copy the file again")


def _content_id(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when the bytes do (not ctime: a chmod or a new link changes that)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class SourceHash:
    """The sha256 of a file, started at once and computed beside the caller's work: taken from the
    hash cache (``hashcache``) when the file is known there; else, for a big file, in a child
    process over a mapping of the file (``_CHILD_CODE``); else (a small file, or no child could be
    started: Windows or ``MODELKIT_PORTABLE`` (no fd passing, no ``SIGBUS``), a frozen app, no
    ``fork``/``exec``, a file system without ``mmap``) with ``pread`` or its portable fallback in a
    thread (``hashlib`` releases the GIL).

    Example:
        >>> h = SourceHash("model.ckpt")  # doctest: +SKIP
        >>> h.hexdigest()                 # doctest: +SKIP
    """

    CHUNK = 4 << 20
    #: files at least this big are hashed in a child process
    CHILD_MIN = 256 << 20

    def __init__(self, path: str):
        self.path = path
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        #: whether the digest came from the hash cache
        self.cached = False
        #: where the digest is cached, as set now (the hash may end after the setting changed)
        self._cache = hashcache.cache_path()
        started = time.time_ns()
        if os.path.isdir(path) and not os.path.islink(path):  # a diffusers folder: its files' listing
            self._thread = threading.Thread(target=self._run_folder, name="modelkit-sha256", daemon=True)
            self._thread.start()
            return
        try:
            # O_NONBLOCK: opening a FIFO must not block; only regular files are read.
            fd = portable.open_fd(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            self._error = _read_error(path, exc)  # raised by hexdigest(), if anything waits for it
            return
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise OSError(f"{path} is not a regular file")
            hit = hashcache.lookup(before, ("sha256",)) if self._cache is not None else None
        except OSError as exc:
            os.close(fd)
            self._error = _read_error(path, exc)
            return
        if hit is not None and "sha256" in hit:
            os.close(fd)
            self._digest, self.cached = hit["sha256"], True
            return
        self._thread = threading.Thread(target=self._run, args=(fd, before, started), name="modelkit-sha256",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> SourceHash:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def _run(self, fd: int, before: os.stat_result, started: int) -> None:
        """Hash the open ``fd`` (closed here): in a child for a big file, else (or if no child could) here."""
        try:
            try:
                digest = self._in_child(fd, before.st_size) if before.st_size >= self.CHILD_MIN else None
                if digest is None and not self._stop.is_set():
                    digest = self._here(fd)
                if digest is None:
                    return  # cancelled
                after = os.fstat(fd)
            finally:
                os.close(fd)
            if _content_id(before) != _content_id(after):
                raise FormatError(self.path, "changed while it was being read", _WAIT)
            self._digest = digest
            if self._cache is not None:
                hashcache.store(self.path, before, after, started, ("sha256",), {"sha256": digest}, self._cache)
        except OSError as exc:
            self._error = _read_error(self.path, exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits for the digest
            self._error = exc

    def _run_folder(self) -> None:
        from ..layout.folder import folder_sha256

        try:
            digest = folder_sha256(self.path, self._stop)
            if digest:
                self._digest = digest
        except OSError as exc:
            self._error = _read_error(self.path, exc)

    def _in_child(self, fd: int, size: int) -> str | None:
        """The digest from a child process; None if no child could compute it (or cancelled)."""
        exe = sys.executable or ""
        # only where the fd can be passed and a cut file ends the child with SIGBUS (POSIX, not
        # MODELKIT_PORTABLE); a frozen app or an embedding host (uWSGI ...) is not a Python to run code with
        if not portable.CHILD_HASH or getattr(sys, "frozen", False) or \
                not os.path.basename(exe).lower().startswith(("python", "pypy")):
            return None
        try:
            proc = subprocess.Popen([exe, "-I", "-S", "-c", _CHILD_CODE, str(fd), str(size), str(os.getpid())],
                                    pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
        except (OSError, ValueError):
            return None
        with self._lock:
            self._proc = proc
            if self._stop.is_set():
                proc.kill()
        out, _ = proc.communicate()
        if self._stop.is_set():
            return None
        if proc.returncode == -signal.SIGBUS:  # (CHILD_HASH: this OS has SIGBUS)
            if os.fstat(fd).st_size < size:
                raise FormatError(self.path, "got shorter while it was being read", _WAIT)
            return None  # a read error under the mapping: the read here reports it
        text = out.decode("ascii", "replace").strip()
        return text if proc.returncode == 0 and len(text) == 64 else None

    def _here(self, fd: int) -> str | None:
        """The digest read with ``pread`` (or its portable fallback) in this thread; None if cancelled."""
        h = hashlib.sha256()
        buf = bytearray(self.CHUNK)
        view = memoryview(buf)
        pos = 0
        while not self._stop.is_set():
            n = portable.read_once(fd, view, pos)
            if not n:
                return h.hexdigest()
            h.update(view[:n])
            pos += n
        return None

    def hexdigest(self) -> str:
        """Wait for the hash; raises the error that stopped it, if any (a ``FormatError`` naming
        the file for a read error)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def cancel(self) -> None:
        self._stop.set()
        with self._lock:
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join()


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextlib.contextmanager
def core_for_hash(uses_torch: bool) -> Iterator[None]:
    """While a ``SourceHash`` runs beside torch maths, give torch's intra-op pool one core fewer.

    The hash (a thread or a child process) keeps one core busy; a torch pool as wide as the machine then fights it for
    that core and both slow down (on 2 cores a prune took 3.2-4.0 s instead of 2.2 s). Nested and
    concurrent users share one saved setting, restored when the last one leaves. Nothing happens
    when ``uses_torch`` is false (torch is then not even imported) or on a single core.
    """
    global _threads_users, _threads_saved
    from .._torch import have_torch

    if not uses_torch or not have_torch():
        yield
        return
    import torch

    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved > 1:
                torch.set_num_threads(_threads_saved - 1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved > 1:
                torch.set_num_threads(_threads_saved)
