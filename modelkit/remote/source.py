"""``RemoteSource``: the readers' byte-range interface over a remote file (see ``modelkit.remote``)."""

from __future__ import annotations

import bisect
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .. import remote as cfg
from ..errors import RemoteError, TruncatedFileError
from ..model import Source
from . import Transfer, hub_sha_mismatch, max_download
from .http import backend_for


class RemoteSource(Source):
    """A remote file read by byte ranges (see the module notes). Thread-safe.

    Attributes:
        path: the URL as given (findings name it).
        size: the file's length.
        head: its first bytes (up to ``HEAD_BYTES``).
        transfer: requests made and bytes received.
        notes: what the reading had to do differently (a server ignoring ``Range``).
    """

    def __init__(self, url: str, *, spool: str | None = None, cap: int | None = None,
                 on_bytes: Callable[[int], None] | None = None):
        """Open ``url`` (its first bytes, length and validator).

        Args:
            spool: where a whole-file read goes (a new file at that path, which the caller removes);
                default an anonymous temporary file.
            cap: the most bytes a whole-file read may take (default ``max_download()``).
            on_bytes: called with the size of each piece of a whole-file read as it arrives.
        """
        self.path = url
        self._spool, self._cap, self._on_bytes = spool, cap, on_bytes
        self.fd = -1
        self.size = -1
        self.transfer = Transfer()
        self.notes: list[str] = []
        self._tmp: Any = None
        self._lock = threading.RLock()
        self._starts: list[int] = []
        self._spans: dict[int, bytes] = {}
        self._cached = 0
        self._sha_checked = False
        self._backend = backend_for(url)
        head = self._backend.open(self)
        if self.fd < 0:
            self.size = self._backend.size
            self._put(0, head)
        self.head = self.pread(min(cfg.HEAD_BYTES, self.size), 0) if self.size > 0 else b""

    @property
    def pins(self) -> dict[str, str | bool | None]:
        """What names the bytes read (``etag``; for ``hf://``, ``commit`` and the Hub's ``sha256``), and
        whether the bytes were checked against that ``sha256`` (only a file read whole can be)."""
        return {**self._backend.pins, "sha256_checked": self._sha_checked}

    # -- whole-file mode
    def whole_from(self, chunks: Iterable[bytes], expect: int | None, why: str | None, counted: bool = False) -> None:
        """Copy a whole body into an anonymous temporary file and read from it from now on."""
        cap = max_download() if self._cap is None else self._cap
        if expect is not None and expect > cap:
            raise RemoteError(self.path, f"{'the server ignores Range requests, and ' if why else ''}the file is "
                                         f"{expect} bytes, over the {cap}-byte cap on reading a remote file whole",
                              "Download it and scan the local copy, or raise MODELKIT_REMOTE_MAX_DOWNLOAD")
        tmp = self._spool_file(expect) if self._spool else tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        got = 0
        claim = self._backend.pins.get("sha256") or ""
        digest = hashlib.sha256() if claim else None  # the Hub's SHA-256 of the file, checked when read whole
        try:
            for c in chunks:
                if digest is not None:
                    digest.update(c)
                got += len(c)
                if got > cap or (expect is not None and got > expect):
                    raise RemoteError(self.path, f"the server sent more than {expect if expect is not None else cap} "
                                                 "bytes for the file")
                self._write(tmp, c)
                if self._on_bytes is not None:
                    self._on_bytes(len(c))
            self._write(tmp, b"")
        except BaseException:
            tmp.close()
            raise
        if not counted:
            self.transfer.add(got)
        if expect is not None and got != expect:
            tmp.close()
            raise RemoteError(self.path, f"the server cut the file short: {got} of {expect} bytes")
        if got == 0:
            tmp.close()
            raise TruncatedFileError(self.path, "the file is empty (0 bytes)")
        if digest is not None and digest.hexdigest() != claim:
            tmp.close()
            raise hub_sha_mismatch(self.path, claim, digest.hexdigest())
        self._sha_checked = digest is not None
        with self._lock:
            self._tmp = tmp
            self.fd = tmp.fileno()
            self.size = got
            self.transfer.whole = True
            self._spans.clear()
            self._starts.clear()
            self._cached = 0
        if why:
            self.notes.append(f"{why}: the whole file ({got} bytes) was downloaded to scan it")

    def _spool_file(self, expect: int | None) -> Any:
        """The new file at ``spool`` (its owner's only), once its folder has room for ``expect`` bytes."""
        from .. import portable
        from ..errors import OutputWriteError
        from ..paths import ensure_room

        assert self._spool is not None
        if expect is not None:
            ensure_room(self._spool, expect)
        try:
            fd = portable.open_fd(self._spool, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutputWriteError(self._spool, f"cannot write the download ({exc.strerror or exc})",
                                   "Choose a folder you can write to") from None
        return os.fdopen(fd, "w+b")

    def _write(self, f: Any, data: bytes) -> None:
        """Write a piece of a whole-file read (``b""``: flush); a local failure is the output folder's."""
        try:
            if data:
                f.write(data)
            else:
                f.flush()
        except OSError as exc:
            if not self._spool:
                raise
            from ..errors import OutputWriteError

            raise OutputWriteError(self._spool, f"cannot write the download ({exc.strerror or exc})",
                                   "Free some space, or choose another output folder") from None

    def materialize(self) -> None:
        """Read the whole file into a local temporary copy (containers that are read whole)."""
        if self.fd >= 0:
            return
        self._backend.stream(self)

    # -- ranged mode
    def _put(self, start: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if start in self._spans:
                return
            bisect.insort(self._starts, start)
            self._spans[start] = data
            self._cached += len(data)
            while self._cached > cfg.CACHE_BYTES and len(self._starts) > 1:
                oldest = next(iter(self._spans))  # insertion order: the oldest span goes first
                self._cached -= len(self._spans.pop(oldest))
                self._starts.remove(oldest)

    def _gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) the cache does not hold."""
        out = []
        pos = start
        with self._lock:
            i = max(bisect.bisect_right(self._starts, start) - 1, 0)
            while pos < end and i < len(self._starts):
                s = self._starts[i]
                e = s + len(self._spans[s])
                if s > pos:
                    out.append((pos, min(s, end)))
                pos = max(pos, e)
                i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def _widen(self, gap: tuple[int, int]) -> tuple[int, int]:
        """A gap grown to ``MIN_FETCH`` bytes, not into what the cache holds."""
        s, e = gap
        if e - s >= cfg.MIN_FETCH:
            return s, e
        want = min(s + cfg.MIN_FETCH, self.size)
        with self._lock:
            i = bisect.bisect_right(self._starts, s)
            nxt = self._starts[i] if i < len(self._starts) else self.size
        return s, max(e, min(want, nxt))

    def _copy_out(self, view: memoryview, offset: int) -> bool:
        """Fill ``view`` from the cache; False when some part is missing."""
        end = offset + len(view)
        with self._lock:
            i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
            pos = offset
            while pos < end and i < len(self._starts):
                s = self._starts[i]
                data = self._spans[s]
                e = s + len(data)
                if s <= pos < e:
                    n = min(e, end) - pos
                    view[pos - offset : pos - offset + n] = memoryview(data)[pos - s : pos - s + n]
                    pos += n
                elif s > pos:
                    return False
                i += 1
            return pos >= end

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        n = len(view)
        if self.fd >= 0:
            super().read_into(view, offset)
            return
        if offset < 0 or offset + n > self.size:
            raise TruncatedFileError(self.path, f"the file ends at byte {self.size}, inside the data read")
        if n == 0:
            return
        if n >= cfg.BIG_READ:
            pos = 0
            while pos < n:
                k = min(cfg.BIG_STEP, n - pos)
                view[pos : pos + k] = self._backend.fetch(self, offset + pos, offset + pos + k)
                pos += k
            return
        if self._copy_out(view, offset):  # the usual case once the scan's spans are prefetched
            return
        for gap in self._gaps(offset, offset + n):
            s, e = self._widen(gap)
            self._put(s, self._backend.fetch(self, s, e))
        if not self._copy_out(view, offset):  # evicted meanwhile (another thread): read it directly
            view[:] = self._backend.fetch(self, offset, offset + n)

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
        """Fetch announced (offset, size) spans together: missing parts widened, merged, on threads."""
        if self.fd >= 0:
            return
        gaps: list[tuple[int, int]] = []
        for off, size in spans:
            if off < 0 or size <= 0 or off >= self.size:
                continue
            for g in self._gaps(off, min(off + size, self.size)):
                gaps.append(self._widen(g))
        if not gaps:
            return
        merged = _merge(sorted(gaps), cfg.MERGE_GAP, min(cfg.MERGE_BUDGET, self.size // 4096))
        merged = self._fetch_many(merged)
        if not merged:
            return
        if len(merged) == 1:
            s, e = merged[0]
            self._put(s, self._backend.fetch(self, s, e))
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(cfg.PREFETCH_THREADS, len(merged))) as pool:
            for (s, _e), data in zip(merged, pool.map(lambda g: self._backend.fetch(self, *g), merged)):
                self._put(s, data)

    def _fetch_many(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Fetch ``spans`` several to a request where the server answers ``multipart/byteranges``;
        returns what is still missing (everything, where it does not)."""
        many = getattr(self._backend, "fetch_many", None)
        if many is None or len(spans) < 2 or getattr(self._backend, "multirange", None) is False:
            return spans
        n = cfg.RANGES_PER_REQUEST
        batches = [spans[i : i + n] for i in range(0, len(spans), n)]
        for a, data in many(self, batches[0]):  # the first tells whether the server can
            self._put(a, data)
        if getattr(self._backend, "multirange", False) and len(batches) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(cfg.PREFETCH_THREADS, len(batches) - 1)) as pool:
                for got in pool.map(lambda b: many(self, b), batches[1:]):
                    for a, data in got:
                        self._put(a, data)
        return [g for s, e in spans for g in self._gaps(s, e)]

    def finish(self) -> None:
        """Check, where the backend can, that the file did not change while it was read."""
        recheck = getattr(self._backend, "recheck", None)
        if recheck is not None and self.fd < 0:
            recheck()

    def close(self) -> None:
        with self._lock:
            self._spans.clear()
            self._starts.clear()
            self._cached = 0
            if self._tmp is not None:
                self._tmp.close()
                self._tmp = None
            self.fd = -1



class RemoteBytes:
    """A remote file's bytes as the pickle VM reads them (``len``, an index, a slice, ``find``), fetched
    on demand: a file the scan reads only the start of (a GGUF: its header, and the few bytes a
    pickle VM gets through from byte 0) is never downloaded whole. Reads go through a window that
    doubles, up to ``WINDOW_MAX``, while they go forward, so a long read costs few requests."""

    WINDOW_MIN = 64 << 10
    WINDOW_MAX = 16 << 20

    def __init__(self, src: RemoteSource):
        self.src = src
        self.size = src.size
        self.start = 0
        self.win = b""
        self.step = self.WINDOW_MIN
        #: what the scan may fetch through this view in all: the cap on a whole-file download
        self.budget = max_download()

    def _fetch(self, n: int, pos: int) -> bytes:
        """``n`` bytes at ``pos``, within the budget (a crafted file whose byte-0 pickle reads on and
        on is then an error, as a download over the cap is, not a download into memory)."""
        if n > self.budget:
            raise RemoteError(self.src.path, f"reading it as torch.load would, the scan would fetch more than "
                                             f"{max_download()} bytes, the cap on reading a remote file whole",
                              "Download it and scan the local copy, or raise MODELKIT_REMOTE_MAX_DOWNLOAD")
        self.budget -= n
        return self.src.pread(n, pos)

    def __len__(self) -> int:
        return self.size

    def _load(self, pos: int) -> None:
        """Make the window hold byte ``pos`` (0 <= pos < size)."""
        if self.start <= pos < self.start + len(self.win):
            return
        forward = pos == self.start + len(self.win)
        self.step = min(self.step * 2, self.WINDOW_MAX) if forward else self.WINDOW_MIN
        self.win = self._fetch(min(self.step, self.size - pos), pos)
        self.start = pos

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(self.size)
            if step != 1:
                raise ValueError("only contiguous slices")
            if b <= a:
                return b""
            if self.start <= a and b <= self.start + len(self.win):
                return self.win[a - self.start : b - self.start]
            if b - a <= self.WINDOW_MAX:
                self._load(a)
                if b <= self.start + len(self.win):
                    return self.win[a - self.start : b - self.start]
            return self._fetch(b - a, a)
        i = key + self.size if key < 0 else key
        if not 0 <= i < self.size:
            raise IndexError("index out of range")
        self._load(i)
        return self.win[i - self.start]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        start, end, _ = slice(start, end).indices(self.size)
        if not sub:
            return start if start <= end else -1
        pos, keep = start, len(sub) - 1
        while pos < end:
            self._load(pos)
            stop = min(end, self.start + len(self.win))
            lo = max(pos - keep, start, 0)  # bytes before ``pos`` again, for a match across windows
            chunk = self.win[lo - self.start : stop - self.start] if lo >= self.start else \
                self._fetch(stop - lo, lo)
            i = chunk.find(sub)
            if i >= 0:
                return lo + i
            pos = stop
        return -1

    def close(self) -> None:
        """Nothing to release: the source is closed by its owner."""


def _merge(spans: list[tuple[int, int]], gap: int, budget: int) -> list[tuple[int, int]]:
    """Sorted spans joined where they are ``gap`` bytes apart or less, then more of them, the closest
    first, while the bytes fetched in between stay within ``budget``: each request saved costs more
    than a few KB of extra transfer, on any link."""
    out = [spans[0]]
    for s, e in spans[1:]:
        ps, pe = out[-1]
        if s <= pe + gap and e - ps <= cfg.BIG_STEP:
            out[-1] = (ps, max(pe, e))
        else:
            out.append((s, e))
    between = sorted((out[i + 1][0] - out[i][1], i) for i in range(len(out) - 1))
    join: set[int] = set()
    for size, i in between:
        if size > budget:
            break
        budget -= size
        join.add(i)
    if not join:
        return out
    done = [out[0]]
    for i in range(1, len(out)):
        if i - 1 in join and out[i][1] - done[-1][0] <= cfg.BIG_STEP:
            done[-1] = (done[-1][0], out[i][1])
        else:
            done.append(out[i])
    return done
