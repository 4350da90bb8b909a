"""Every OS-specific call modelkit makes, with a portable fallback that is just as correct.

Each choice is made once, when this module is imported, and recorded in ``CHOSEN`` (shown by
``describe()``). The native calls are looked up on ``os`` at call time, so a test can still
monkeypatch ``os.preadv`` and friends.

====================  ======================================  ===========================================
what                  native (Linux first)                    fallback
====================  ======================================  ===========================================
positioned read       ``os.preadv`` (no copy), ``os.pread``   a per-descriptor lock around ``os.lseek`` +
                                                              ``readinto``: correct when several threads
                                                              read one file (Windows has neither call)
positioned write      ``os.pwrite``                           the same lock, ``lseek`` there and back
copy between files    ``os.copy_file_range``, then            ``pread`` + ``write`` through one reused
                      ``os.sendfile`` (Linux: elsewhere it    buffer
                      needs a socket)
usable cores          ``os.sched_getaffinity``                ``os.process_cpu_count`` (3.13),
                                                              ``os.cpu_count``, 1
hard links            ``os.link`` (no-overwrite publish)      exclusive create, then replace
                                                              (``modelkit.paths``)
source hash           a child process mapping the file        ``pread`` in a thread
                      (POSIX: passes the fd, ``SIGBUS``)
folder fsync          ``open(folder)`` + ``fsync`` (POSIX)    none (Windows cannot open a folder)
writeback hint        ``sync_file_range`` (Linux)             none (the final ``fsync`` does it all)
====================  ======================================  ===========================================

Every ``os.open`` of model bytes goes through ``open_fd``, which adds ``O_BINARY`` where it
exists (Windows opens in text mode without it, and would translate bytes).

Setting:
    ``MODELKIT_PORTABLE=1`` (read once, at import): behave as on a platform that has none of the
    native calls above: every fallback is taken, and Windows' rules for output names
    (``windows_name_problem``), the 260-character path limit for temp files and the retries of
    a replace onto a file held open apply. It is how CI runs the fallbacks on Linux, and a way
    around a native call that misbehaves on an unusual file system. Unset, empty or ``0``: off.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import signal
import sys
import threading
from collections.abc import Callable

#: The name of the setting.
ENV = "MODELKIT_PORTABLE"

#: ``MODELKIT_PORTABLE`` is set (to anything but empty or ``0``).
PORTABLE: bool = os.environ.get(ENV, "").strip() not in ("", "0")

#: Windows' rules apply to output names, temp names and replaces (on Windows, or portable).
WINDOWS_RULES: bool = os.name == "nt" or PORTABLE

#: The folder holding a new file can be fsynced (POSIX; not Windows, not portable).
FOLDER_FSYNC: bool = os.name == "posix" and not PORTABLE

#: Hard links back the no-overwrite publication of an output.
HARD_LINKS: bool = hasattr(os, "link") and not PORTABLE

#: A child process can hash a file through the inherited fd and a shared mapping, and a cut file
#: ends it with ``SIGBUS`` (POSIX: ``pass_fds``, ``MAP_SHARED``).
CHILD_HASH: bool = (os.name == "posix" and not PORTABLE and hasattr(signal, "SIGBUS")
                    and hasattr(mmap, "MAP_SHARED") and hasattr(mmap, "PROT_READ"))

#: Linux's ``sync_file_range`` may start the writeback of an output early.
LINUX_WRITEBACK: bool = sys.platform.startswith("linux") and not PORTABLE


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Tell the kernel it may drop ``[offset, offset+length)`` of ``fd`` from the page cache (bytes
    already on disk: a written output the process will not read again). Linux ``posix_fadvise``
    DONTNEED where the writer streams with ``LINUX_WRITEBACK``; a no-op elsewhere."""
    if LINUX_WRITEBACK and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

#: ``O_BINARY`` on Windows (no newline translation), 0 elsewhere.
O_BINARY: int = getattr(os, "O_BINARY", 0)

#: What was chosen for each call (for tests and diagnostics).
CHOSEN: dict[str, str] = {"mode": "portable" if PORTABLE else "native"}

#: Longest single read or write asked of the OS (Windows and macOS cap one call near 2 GiB).
MAX_IO = 1 << 30


def _native(name: str) -> bool:
    return not PORTABLE and hasattr(os, name)


def describe() -> str:
    """One line: the mode and each choice, e.g. ``native: read=preadv, write_at=pwrite, ...``."""
    rest = ", ".join(f"{k}={v}" for k, v in CHOSEN.items() if k != "mode")
    return f"{CHOSEN['mode']}: {rest}"


def open_fd(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` with ``O_BINARY`` (Windows) and ``O_CLOEXEC`` (POSIX) added."""
    return os.open(path, flags | O_BINARY | getattr(os, "O_CLOEXEC", 0), mode)


# --- Positioned reads and writes -----------------------------------------------------------------

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _fd_lock(fd: int) -> threading.Lock:
    """The lock that makes ``lseek`` + read/write one step for ``fd`` (one lock per fd number)."""
    with _locks_guard:
        lock = _locks.get(fd)
        if lock is None:
            lock = _locks[fd] = threading.Lock()
        return lock


def read_preadv(fd: int, view: memoryview, offset: int) -> int:
    """One ``preadv`` into ``view``; the bytes read (0 at end of file)."""
    return os.preadv(fd, [view], offset)


def read_pread(fd: int, view: memoryview, offset: int) -> int:
    """One ``pread`` copied into ``view``; the bytes read (0 at end of file)."""
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def read_seek(fd: int, view: memoryview, offset: int) -> int:
    """One read at ``offset`` without ``pread``: ``lseek`` and ``readinto`` under ``fd``'s lock, so
    threads reading one descriptor never move its position under each other."""
    with _fd_lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        with io.FileIO(fd, "rb", closefd=False) as f:
            n = f.readinto(view)
    if n is None:  # a non-blocking fd with nothing to read now: never a regular file
        raise BlockingIOError(errno.EAGAIN, "no data available now")
    return n


#: One read at an offset into a buffer; the count (0 at end of file). Never moves the fd's position
#: as other readers of the fd see it.
if _native("preadv"):
    read_once: Callable[[int, memoryview, int], int] = read_preadv
    CHOSEN["read"] = "preadv"
elif _native("pread"):
    read_once = read_pread
    CHOSEN["read"] = "pread"
else:
    read_once = read_seek
    CHOSEN["read"] = "lseek+readinto (locked)"


def read_into(fd: int, buf: bytearray | memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset`` of ``fd``, looping over short reads; safe from several threads.

    Returns:
        The bytes read: ``len(buf)``, or fewer when the file ends first.

    Raises:
        OSError: from the OS (EIO ...).
    """
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = read_once(fd, view[done : done + MAX_IO], offset + done)
        if n <= 0:
            break
        done += n
    return done


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` at ``fd``'s position, looping over short writes."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view[:MAX_IO]) :]


def write_at_pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` until all of ``data`` is written."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + MAX_IO], offset + done)


def write_at_seek(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` without ``pwrite``: under ``fd``'s lock, seek there, write, seek back."""
    with _fd_lock(fd):
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            write_all(fd, data)
        finally:
            os.lseek(fd, pos, os.SEEK_SET)


#: Write all of some bytes at an offset of an fd, leaving its position where it was.
if _native("pwrite"):
    write_at: Callable[[int, bytes | bytearray | memoryview, int], None] = write_at_pwrite
    CHOSEN["write_at"] = "pwrite"
else:
    write_at = write_at_seek
    CHOSEN["write_at"] = "lseek+write (locked)"


# --- Copies between files ------------------------------------------------------------------------

#: The in-kernel copies this platform has, best first. ``sendfile`` only on Linux: macOS and the
#: BSDs send a file to a socket only.
KERNEL_COPIES: tuple[str, ...] = tuple(
    k for k in ("copy_file_range", "sendfile")
    if _native(k) and (k != "sendfile" or sys.platform.startswith("linux")))
CHOSEN["copy"] = " > ".join((*KERNEL_COPIES, "read+write"))

#: errno values after which an in-kernel copy is given up for the next way (another file system,
#: no support, an output it cannot write to).
KERNEL_REFUSED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP,
                            errno.EPERM, errno.EBADF, errno.ENOTSOCK})


class RangeCopier:
    """Copy byte ranges of input files to the current position of one output descriptor.

    Each in-kernel way in ``KERNEL_COPIES`` is tried until one is refused (an errno in
    ``KERNEL_REFUSED``), then the next; last comes ``read_into`` + ``write`` through one reused
    buffer of ``chunk`` bytes. Every way gives the same bytes at the same place.
    """

    def __init__(self, dst_fd: int, chunk: int = 8 << 20):
        self.dst = dst_fd
        self.chunk = chunk
        #: the in-kernel ways still worth trying, best first
        self.kernel = list(KERNEL_COPIES)
        self.buf: bytearray | None = None

    def _kernel(self, kind: str, src_fd: int, offset: int, count: int) -> int:
        count = min(count, MAX_IO)
        if kind == "copy_file_range":
            return os.copy_file_range(src_fd, self.dst, count, offset)
        return os.sendfile(self.dst, src_fd, offset, count)

    def copy(self, src_fd: int, offset: int, count: int) -> int:
        """Copy ``count`` bytes from ``offset`` of ``src_fd``.

        Returns:
            The bytes copied: ``count``, or fewer when the input ends first.

        Raises:
            OSError: from the OS (ENOSPC, EIO ...).
        """
        done = 0
        while done < count and self.kernel:
            try:
                n = self._kernel(self.kernel[0], src_fd, offset + done, count - done)
            except OSError as exc:
                if exc.errno not in KERNEL_REFUSED:
                    raise
                self.kernel.pop(0)  # refused here: try the next way
                continue
            if n == 0:
                return done
            done += n
        while done < count:
            if self.buf is None:
                self.buf = bytearray(self.chunk)
            part = memoryview(self.buf)[: min(len(self.buf), count - done)]
            got = read_once(src_fd, part, offset + done)
            if got <= 0:
                return done
            write_all(self.dst, part[:got])
            done += got
        return done


# --- Cores ---------------------------------------------------------------------------------------

def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def _process_cpus() -> int:
    return os.process_cpu_count() or 1  # type: ignore[attr-defined,unused-ignore]  # 3.13


def _cpus() -> int:
    return os.cpu_count() or 1


if _native("sched_getaffinity"):
    _count: Callable[[], int] = _affinity
    CHOSEN["cpus"] = "sched_getaffinity"
elif hasattr(os, "process_cpu_count"):
    _count = _process_cpus
    CHOSEN["cpus"] = "process_cpu_count"
else:
    _count = _cpus
    CHOSEN["cpus"] = "cpu_count"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the OS tells it), at least 1."""
    try:
        return max(1, _count())
    except OSError:
        return max(1, os.cpu_count() or 1)


CHOSEN["link"] = "link" if HARD_LINKS else ("rename" if os.name == "nt" else "exclusive create+replace")
CHOSEN["hash_child"] = "mmap child" if CHILD_HASH else "thread"
CHOSEN["folder_fsync"] = "yes" if FOLDER_FSYNC else "no"
CHOSEN["names"] = "windows" if WINDOWS_RULES else "posix"
