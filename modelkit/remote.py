"""Remote model files read by byte ranges: ``https://`` URLs, ``hf://`` paths and any fsspec URL.

A scan needs few of a file's bytes: a safetensors header, or a torch zip's end records, central
directory, local headers and pickles (about 1 MB of a 2 GB checkpoint). ``RemoteSource`` is a
``Source`` (the readers' byte-range interface) that fetches just those ranges:

* small reads go through a span cache and are widened to ``MIN_FETCH`` bytes, so the many small
  reads of one region (a local header, the member name, the first bytes of the member) cost one
  request; readers may announce the spans they will read (``prefetch``), which are then fetched
  together, nearby ones merged, on a few threads;
* every answer is checked against the first one: status 206, the ``Content-Range`` asked for,
  the same total length, a body of exactly that length, the same ``ETag`` (or
  ``Last-Modified``). Anything else fails closed with ``RemoteError``, one line saying what the
  server did: a scan of a file that changes under it would be a scan of no file at all;
* a server that ignores ``Range`` and answers 200 with the whole body is read whole, up to a cap,
  into an anonymous temporary file, and the scan says so;
* containers that are read whole anyway (plain pickles, legacy torch streams, tar archives,
  compressed wrappers) are downloaded whole, up to the same cap (``materialize``).

The HTTP client is huggingface_hub's (``get_session``/``http_backoff``: retries with back-off on
429/5xx and timeouts, redirects followed, ``HF_TOKEN`` and ``HF_ENDPOINT`` honoured for
``hf://``); other schemes go through fsspec. Both are the ``modelkit[remote]`` extra.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import InputNotFoundError, MissingExtraError, RemoteError, TruncatedFileError, UsageError
from .model import Source

#: Bytes asked for at least, per request: one local header, its name and a member's first bytes.
MIN_FETCH = 512
#: Reads at least this big bypass the cache (tensor data, a hash): fetched in ``BIG_STEP`` pieces.
BIG_READ = 1 << 20
BIG_STEP = 16 << 20
#: Announced spans closer than this are fetched as one request.
MERGE_GAP = 2048
#: What the span cache holds at most.
CACHE_BYTES = 64 << 20
#: The first request asks for this much (a safetensors header usually fits).
HEAD_BYTES = 64 << 10
#: Requests in flight at once for announced spans.
PREFETCH_THREADS = 16
#: The most a file read whole may take (env ``MODELKIT_REMOTE_MAX_DOWNLOAD``, bytes).
DEFAULT_MAX_DOWNLOAD = 8 << 30
TIMEOUT = 60.0
#: Retries of a request answered 429/5xx or lost on the network, and the first wait (doubling).
RETRIES = 5
BASE_WAIT = 0.5

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_INSTALL = "pip install 'modelkit[remote]'"
# huggingface_hub logs each retry as a warning; the scan's own result says what failed.
logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for a URL (``scheme://...``) other than ``file://``."""
    if not isinstance(path, str):
        return False
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() != "file"


def max_download() -> int:
    """The cap on a file read whole, from ``MODELKIT_REMOTE_MAX_DOWNLOAD`` (bytes) or the default."""
    raw = os.environ.get("MODELKIT_REMOTE_MAX_DOWNLOAD", "")
    try:
        return int(raw) if raw else DEFAULT_MAX_DOWNLOAD
    except ValueError:
        raise UsageError(None, f"MODELKIT_REMOTE_MAX_DOWNLOAD must be a number of bytes, not {raw!r}") from None


# -- hf:// paths ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfPath:
    """``hf://ORG/REPO[@REV][/PATH]``: a file, or with no path every model file of the repo."""

    repo: str
    revision: str | None
    path: str | None

    def url(self) -> str:
        return f"hf://{self.repo}{'@' + self.revision if self.revision else ''}{'/' + self.path if self.path else ''}"


def parse_hf(url: str) -> HfPath:
    """Split an ``hf://`` path; ``@refs/pr/N`` revisions are kept whole.

    Raises:
        UsageError: not ``hf://ORG/REPO...``.
    """
    rest = url[len("hf://"):] if url.lower().startswith("hf://") else ""
    m = re.match(r"^([^/@\s]+)/([^/@\s]+)(?:@(refs/pr/\d+|[^/\s]+))?(?:/(.+))?$", rest)
    if not m:
        raise UsageError(url, "is not an hf:// path: write hf://ORG/REPO[@REVISION][/PATH]")
    path = m.group(4)
    if path is not None and (path.startswith("/") or ".." in path.split("/")):
        raise UsageError(url, "the path inside the repository is not a plain relative path")
    return HfPath(f"{m.group(1)}/{m.group(2)}", m.group(3), path or None)


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def expand(paths: Iterable[str], extensions: Sequence[str]) -> Iterator[str]:
    """Each remote path as given, except ``hf://ORG/REPO[@REV]``: its model files, one path each.

    Raises:
        MissingExtraError: huggingface_hub is not installed.
        RemoteError: the repository cannot be listed.
    """
    for p in paths:
        if not p.lower().startswith("hf://"):
            yield p
            continue
        hp = parse_hf(p)
        if hp.path is not None:
            yield p
            continue
        for name in _list_repo(hp, p):
            if name.lower().endswith(tuple(extensions)):
                yield HfPath(hp.repo, hp.revision, name).url()


def _list_repo(hp: HfPath, label: str) -> list[str]:
    hub = _hub()
    try:
        api = hub.HfApi(endpoint=_hf_endpoint())
        return sorted(api.list_repo_files(hp.repo, revision=hp.revision))
    except Exception as exc:  # noqa: BLE001 - the hub client's errors are many; each becomes one line
        raise RemoteError(label, f"cannot list the repository ({_why(exc)})") from None


def require(url: str) -> None:
    """Raise ``MissingExtraError`` (one line naming the pip command) when ``url`` needs a package
    this install lacks: huggingface_hub for ``http(s)://`` and ``hf://``, fsspec (and the scheme's
    backend) for the rest."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https", "hf"):
        _hub()
    else:
        _Fsspec(url)


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.utils  # noqa: F401 - a lazy attribute of the package otherwise
    except ImportError:
        raise MissingExtraError(None, "remote paths need huggingface_hub", f"Install it: {_INSTALL}") from None
    return huggingface_hub


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- transfer accounting ------------------------------------------------------------------------------


@dataclass
class Transfer:
    """What one remote file cost: requests made and body bytes received."""

    requests: int = 0
    bytes: int = 0
    whole: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, n: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes, "whole_file": self.whole}


# -- backends -------------------------------------------------------------------------------------------


class _Http:
    """Ranged GETs through huggingface_hub's client (retries, back-off, redirects)."""

    def __init__(self, url: str, label: str, headers: dict[str, str]):
        self.url = url
        self.label = label
        self.headers = headers
        self.validator: tuple[str, str] | None = None
        self.size = -1

    def _check(self, resp: Any) -> None:
        code = int(resp.status_code)
        if code in (200, 206):
            return
        reason = getattr(resp, "reason_phrase", "") or ""
        remedy = None
        if code in (401, 403):
            remedy = "Set HF_TOKEN to a token that can read it" if self.label.lower().startswith("hf://") else \
                "The server refuses access; check the URL"
        elif code == 404:
            remedy = "Check the URL (and the revision)"
        raise RemoteError(self.label, f"the server answered HTTP {code}{' ' + reason if reason else ''}", remedy)

    def _validator(self, resp: Any) -> tuple[str, str] | None:
        h = resp.headers
        for name in ("etag", "last-modified"):
            v = h.get(name)
            if v:
                return name, v.removeprefix("W/")
        return None

    def _same_file(self, resp: Any) -> None:
        got = self._validator(resp)
        if self.validator is not None and got != self.validator:
            was = f"{self.validator[0]} {self.validator[1]}"
            now = f"{got[0]} {got[1]}" if got else "none"
            raise RemoteError(self.label, f"the file changed between requests ({was}, then {now}); the scan of a "
                                          "changing file proves nothing")

    def _range(self, resp: Any, start: int, end: int) -> None:
        cr = resp.headers.get("content-range")
        m = _CONTENT_RANGE.match(cr or "")
        if not m:
            raise RemoteError(self.label, f"the server answered a range request without a usable Content-Range "
                                          f"({cr!r})")
        a, b, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total == "*":
            raise RemoteError(self.label, "the server does not say how long the file is (Content-Range total '*')")
        if self.size >= 0 and int(total) != self.size:
            raise RemoteError(self.label, f"the server gave the file's length as {self.size} bytes, then as {total}")
        if a == start and b < min(end, int(total)) - 1:
            raise RemoteError(self.label, f"asked for bytes {start}-{min(end, int(total)) - 1}, the server sent only "
                                          f"{a}-{b}: the file is shorter than the length it gave ({total} bytes)")
        if a != start or b != min(end, int(total)) - 1:
            raise RemoteError(self.label, f"asked for bytes {start}-{end - 1}, the server sent {a}-{b}")

    def _get(self, src: RemoteSource, start: int, end: int | None, first: bool = False) -> bytes:
        """GET bytes [start, end) (``end`` None: the whole file, into ``src``'s local copy).

        Status retries (429/5xx) and network retries before the answer are huggingface_hub's;
        a body that breaks off is not retried: it fails closed.
        """
        hub = _hub()
        headers = dict(self.headers)
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        try:
            with hub.utils.http_stream_backoff("GET", self.url, headers=headers, timeout=TIMEOUT,
                                               max_retries=RETRIES, base_wait_time=BASE_WAIT,
                                               max_wait_time=8) as resp:
                try:
                    return self._answer(src, resp, start, end, first)
                except (RemoteError, TruncatedFileError):
                    raise
                except Exception as exc:  # noqa: BLE001 - a body that breaks off, in any way
                    raise _network_error(self.label, exc) from None
        except (RemoteError, TruncatedFileError):
            raise
        except Exception as exc:  # noqa: BLE001 - network errors of any kind: one line
            raise _network_error(self.label, exc) from None

    def _answer(self, src: RemoteSource, resp: Any, start: int, end: int | None, first: bool) -> bytes:
        code = int(resp.status_code)
        if code == 416 and first:
            raise TruncatedFileError(self.label, "the file is empty (0 bytes)")
        self._check(resp)
        if first:
            self.validator = self._validator(resp)
        else:
            self._same_file(resp)
        length = resp.headers.get("content-length")
        declared = int(length) if length and length.isdigit() else None
        if end is None or code == 200:
            if end is not None and not first:
                raise RemoteError(self.label, "the server answered a range request with the whole file, after "
                                              "answering the first one with a range")
            if self.size >= 0 and declared is not None and declared != self.size:
                raise RemoteError(self.label, f"the server gave the file's length as {self.size} bytes, then as "
                                              f"{declared}")
            src.whole_from(resp.iter_bytes(), declared if self.size < 0 else self.size,
                           "the server ignores Range requests" if end is not None else None)
            self.size = src.size
            return b""
        if first:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range") or "")
            if m and m.group(3) != "*":
                self.size = int(m.group(3))
        self._range(resp, start, end)
        want = min(end, self.size) - start
        body = _read_capped(resp.iter_bytes(), want, self.label)
        src.transfer.add(len(body))
        return body

    def open(self, src: RemoteSource) -> bytes:
        """The first request: the file's head, length and validator (or the whole file, when the
        server ignores ``Range``: then ``src`` is switched to its local copy)."""
        return self._get(src, 0, HEAD_BYTES, first=True)

    def fetch(self, src: RemoteSource, start: int, end: int) -> bytes:
        return self._get(src, start, end)

    def stream(self, src: RemoteSource) -> None:
        self._get(src, 0, None)


class _Fsspec:
    """Any fsspec URL (``s3://``, ``gs://`` ...) with its backend installed."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise MissingExtraError(url, "this URL needs fsspec", f"Install it: {_INSTALL}") from None
        self.label = url
        try:
            self.fs, self.fspath = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise MissingExtraError(url, f"no fsspec backend for this URL ({_why(exc)})",
                                    "Install the fsspec backend for its scheme (s3fs, gcsfs, adlfs ...)") from None
        self.validator: Any = None
        self.size = -1

    def _info(self) -> dict[str, Any]:
        try:
            info = dict(self.fs.info(self.fspath))
        except FileNotFoundError:
            raise InputNotFoundError(self.label, "no such remote file") from None
        except Exception as exc:  # noqa: BLE001
            raise _network_error(self.label, exc) from None
        return info

    def open(self, src: RemoteSource) -> bytes:
        info = self._info()
        if info.get("type") == "directory":
            raise RemoteError(self.label, "is a folder, not a file", "Give a file URL")
        self.size = int(info.get("size") or 0)
        self.validator = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        if self.size == 0:
            raise TruncatedFileError(self.label, "the file is empty (0 bytes)")
        return self.fetch(src, 0, min(HEAD_BYTES, self.size))

    def fetch(self, src: RemoteSource, start: int, end: int) -> bytes:
        try:
            body = bytes(self.fs.cat_file(self.fspath, start=start, end=end))
        except Exception as exc:  # noqa: BLE001
            raise _network_error(self.label, exc) from None
        src.transfer.add(len(body))
        if len(body) != end - start:
            raise RemoteError(self.label, f"the storage returned {len(body)} of the {end - start} bytes {start}-{end - 1}")
        return body

    def stream(self, src: RemoteSource) -> None:
        def chunks() -> Iterator[bytes]:
            pos = 0
            while pos < self.size:
                n = min(BIG_STEP, self.size - pos)
                yield self.fetch(src, pos, pos + n)
                pos += n

        src.whole_from(chunks(), self.size, None, counted=True)

    def recheck(self) -> None:
        info = self._info()
        now = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        if int(info.get("size") or 0) != self.size or now != self.validator:
            raise RemoteError(self.label, "the file changed while it was read")


def _network_error(label: str, exc: BaseException) -> RemoteError:
    if isinstance(exc, RemoteError):
        return exc
    code = getattr(getattr(exc, "response", None), "status_code", None)
    if code is not None:
        return RemoteError(label, f"the server answered HTTP {code} (after retries)")
    return RemoteError(label, f"cannot read it ({_why(exc)})")


def _read_capped(chunks: Iterable[bytes], limit: int, label: str) -> bytes:
    out = bytearray()
    for c in chunks:
        out += c
        if len(out) > limit:
            raise RemoteError(label, f"the server sent more than the {limit} bytes asked for")
    if len(out) != limit:
        raise RemoteError(label, f"the server cut a response short: {len(out)} of {limit} bytes")
    return bytes(out)


def _backend(url: str) -> _Http | _Fsspec:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return _Http(url, url, {"User-Agent": _user_agent()})
    if scheme == "hf":
        hp = parse_hf(url)
        if hp.path is None:
            raise UsageError(url, "names a repository, not a file", "Add the file's path, or scan the repository "
                                                                     "(scan expands it to its model files)")
        hub = _hub()
        target = hub.hf_hub_url(hp.repo, hp.path, revision=hp.revision, endpoint=_hf_endpoint())
        headers = dict(hub.utils.build_hf_headers(library_name="modelkit", library_version=_version()))
        return _Http(target, url, headers)
    return _Fsspec(url)


def _version() -> str:
    from ._version import __version__

    return __version__


def _user_agent() -> str:
    return f"modelkit/{_version()}"


# -- the Source -------------------------------------------------------------------------------------


class RemoteSource(Source):
    """A remote file read by byte ranges (see the module notes). Thread-safe.

    Attributes:
        path: the URL as given (findings name it).
        size: the file's length.
        head: its first bytes (up to ``HEAD_BYTES``).
        transfer: requests made and bytes received.
        notes: what the reading had to do differently (a server ignoring ``Range``).
    """

    def __init__(self, url: str):  # noqa: D107 - no local file to open
        self.path = url
        self.fd = -1
        self.size = -1
        self.transfer = Transfer()
        self.notes: list[str] = []
        self._tmp: Any = None
        self._lock = threading.RLock()
        self._starts: list[int] = []
        self._spans: dict[int, bytes] = {}
        self._cached = 0
        self._backend = _backend(url)
        head = self._backend.open(self)
        if self.fd < 0:
            self.size = self._backend.size
            self._put(0, head)
        self.head = self.pread(min(HEAD_BYTES, self.size), 0) if self.size > 0 else b""

    # -- whole-file mode
    def whole_from(self, chunks: Iterable[bytes], expect: int | None, why: str | None, counted: bool = False) -> None:
        """Copy a whole body into an anonymous temporary file and read from it from now on."""
        cap = max_download()
        if expect is not None and expect > cap:
            raise RemoteError(self.path, f"{'the server ignores Range requests, and ' if why else ''}the file is "
                                         f"{expect} bytes, over the {cap}-byte cap on reading a remote file whole",
                              "Download it and scan the local copy, or raise MODELKIT_REMOTE_MAX_DOWNLOAD")
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        got = 0
        try:
            for c in chunks:
                got += len(c)
                if got > cap or (expect is not None and got > expect):
                    raise RemoteError(self.path, f"the server sent more than {expect if expect is not None else cap} "
                                                 "bytes for the file")
                tmp.write(c)
            tmp.flush()
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
            while self._cached > CACHE_BYTES and len(self._starts) > 1:
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
        if e - s >= MIN_FETCH:
            return s, e
        want = min(s + MIN_FETCH, self.size)
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
                    view[pos - offset : pos - offset + n] = data[pos - s : pos - s + n]
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
        if n >= BIG_READ:
            pos = 0
            while pos < n:
                k = min(BIG_STEP, n - pos)
                view[pos : pos + k] = self._backend.fetch(self, offset + pos, offset + pos + k)
                pos += k
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
        gaps.sort()
        merged = [gaps[0]]
        for s, e in gaps[1:]:
            ps, pe = merged[-1]
            if s <= pe + MERGE_GAP and e - ps <= BIG_STEP:
                merged[-1] = (ps, max(pe, e))
            else:
                merged.append((s, e))
        if len(merged) == 1:
            s, e = merged[0]
            self._put(s, self._backend.fetch(self, s, e))
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(PREFETCH_THREADS, len(merged))) as pool:
            for (s, _e), data in zip(merged, pool.map(lambda g: self._backend.fetch(self, *g), merged)):
                self._put(s, data)

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


# -- whole-file streams (hash) ----------------------------------------------------------------------


class StreamReader:
    """``readinto`` over a response body, checked against the file's length (no temporary file)."""

    def __init__(self, chunks: Iterable[bytes], size: int, label: str):
        self._it = iter(chunks)
        self._left = b""
        self.size = size
        self.read_so_far = 0
        self.label = label

    def readinto(self, buf: bytearray | memoryview) -> int:
        view = memoryview(buf).cast("B")
        n = 0
        while n < len(view):
            if not self._left:
                try:
                    self._left = next(self._it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - a body that breaks off, in any way
                    raise _network_error(self.label, exc) from None
                continue
            k = min(len(view) - n, len(self._left))
            view[n : n + k] = self._left[:k]
            self._left = self._left[k:]
            n += k
        self.read_so_far += n
        if self.size >= 0 and self.read_so_far > self.size:
            raise RemoteError(self.label, f"the server sent more than the file's {self.size} bytes")
        if n == 0 and self.size >= 0 and self.read_so_far != self.size:
            raise RemoteError(self.label, f"the server cut the file short: {self.read_so_far} of {self.size} bytes")
        return n


@contextmanager
def open_stream(url: str) -> Iterator[StreamReader]:
    """The whole remote file as one stream (``hash``): a GET without ``Range``, its length checked.

    Raises:
        RemoteError: HTTP errors, no length given, a body cut short or too long.
        MissingExtraError: the remote extra is missing.
    """
    backend = _backend(url)
    if isinstance(backend, _Fsspec):
        size = int(backend._info().get("size") or 0)

        def chunks() -> Iterator[bytes]:
            with backend.fs.open(backend.fspath, "rb", block_size=BIG_STEP) as f:
                while True:
                    c = f.read(BIG_STEP)
                    if not c:
                        return
                    yield c

        yield StreamReader(chunks(), size, url)
        return
    hub = _hub()
    try:
        with hub.utils.http_stream_backoff("GET", backend.url, headers=dict(backend.headers), timeout=TIMEOUT,
                                           max_retries=RETRIES, base_wait_time=BASE_WAIT, max_wait_time=8) as resp:
            backend._check(resp)
            if int(resp.status_code) != 200:
                raise RemoteError(url, f"the server answered a plain GET with HTTP {resp.status_code}")
            length = resp.headers.get("content-length")
            if not (length and length.isdigit()):
                raise RemoteError(url, "the server does not say how long the file is (no Content-Length)")
            yield StreamReader(resp.iter_bytes(BIG_STEP), int(length), url)
    except (RemoteError, TruncatedFileError, MissingExtraError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise _network_error(url, exc) from None
