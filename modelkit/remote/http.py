"""The transports of remote files: HTTP through huggingface_hub's client, anything else through
fsspec; ranged GETs checked against the first answer, and whole-file streams."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .. import remote as cfg
from ..errors import InputNotFoundError, MissingExtraError, ModelkitError, RemoteError, TruncatedFileError, UsageError
from . import _CONTENT_RANGE, _INSTALL, COMMIT, NO_PINS, HfPath, _hf_endpoint, _hub, _why, hub_page, parse_hf

if TYPE_CHECKING:
    from .source import RemoteSource


_SHA256 = re.compile(r"[0-9a-f]{64}")


class Http:
    """Ranged GETs through huggingface_hub's client (retries, back-off, redirects)."""

    def __init__(self, url: str, label: str, headers: dict[str, str], hf: HfPath | None = None):
        self.url = url
        self.label = label
        self.headers = headers
        self.validator: tuple[str, str] | None = None
        self.size = -1
        #: whether the server answers several ranges in one request (None: not tried yet)
        self.multirange: bool | None = None
        self.hf = hf
        #: what names the bytes read: ``etag``; for ``hf://``, the ``commit`` the revision resolved
        #: to and the ``sha256`` the Hub gives for the file (LFS files); None where not said
        self.pins = dict(NO_PINS)

    def _pin(self, resp: Any) -> None:
        """Note what the first answer says the file is. For ``hf://``, the later requests go to the
        commit the revision resolved to, so a branch that moves mid-scan cannot mix two files."""
        if self.validator is not None and self.validator[0] == "etag":
            self.pins["etag"] = self.validator[1]
        if self.hf is None:
            return
        for h in [r.headers for r in getattr(resp, "history", None) or ()] + [resp.headers]:
            commit = (h.get("x-repo-commit") or "").strip().lower()
            if COMMIT.fullmatch(commit) and self.pins["commit"] is None:
                self.pins["commit"] = commit
            sha = (h.get("x-linked-etag") or "").strip().removeprefix("W/").strip('"').lower()
            if _SHA256.fullmatch(sha) and self.pins["sha256"] is None:
                self.pins["sha256"] = sha
        commit = self.pins["commit"]
        if commit is not None and self.hf.revision != commit:
            assert self.hf.path is not None
            self.url = _hub().hf_hub_url(self.hf.repo, self.hf.path, revision=commit, repo_type=self.hf.repo_type,
                                         endpoint=_hf_endpoint())

    def _check(self, resp: Any) -> None:
        code = int(resp.status_code)
        if code in (200, 206):
            return
        reason = getattr(resp, "reason_phrase", "") or ""
        remedy = None
        if code in (401, 403):
            remedy = "Set HF_TOKEN to a token that can read it" if self.hf is not None else \
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

    @contextmanager
    def _response(self, headers: dict[str, str]) -> Iterator[Any]:
        """A streamed GET. Status retries (429/5xx) and network retries before the answer are
        huggingface_hub's; any other failure, asking or reading the body, becomes one RemoteError
        line (a body that breaks off is not retried: it fails closed). modelkit's own errors pass."""
        hub = _hub()
        try:
            with hub.utils.http_stream_backoff("GET", self.url, headers=headers, timeout=cfg.TIMEOUT,
                                               max_retries=cfg.RETRIES, base_wait_time=cfg.BASE_WAIT,
                                               max_wait_time=8) as resp:
                try:
                    yield resp
                except ModelkitError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a body that breaks off, in any way
                    raise _network_error(self.label, exc) from None
        except ModelkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - network errors of any kind: one line
            raise _network_error(self.label, exc) from None

    def _get(self, src: RemoteSource, start: int, end: int | None, first: bool = False) -> bytes:
        """GET bytes [start, end) (``end`` None: the whole file, into ``src``'s local copy)."""
        headers = dict(self.headers)
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        with self._response(headers) as resp:
            return self._answer(src, resp, start, end, first)

    def _answer(self, src: RemoteSource, resp: Any, start: int, end: int | None, first: bool) -> bytes:
        code = int(resp.status_code)
        if code == 416 and first:
            raise TruncatedFileError(self.label, "the file is empty (0 bytes)")
        self._check(resp)
        if first:
            self.validator = self._validator(resp)
            self._pin(resp)
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
        return self._get(src, 0, cfg.HEAD_BYTES, first=True)

    def fetch_many(self, src: RemoteSource, spans: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """Several [start, end) spans in one request (``multipart/byteranges``), where the server
        answers so. What it sent comes back as (offset, bytes), every part checked like a single
        range; a server that sends one range (or the whole file: that answer is dropped unread) is
        not asked again, and the caller fetches what is missing one span at a time."""
        if self.multirange is False or len(spans) < 2:
            return []
        headers = {**self.headers, "Range": "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in spans)}
        cap = sum(b - a for a, b in spans) + 256 * len(spans) + 4096
        with self._response(headers) as resp:
            if int(resp.status_code) == 200:
                self.multirange = False  # the whole file is coming: closing drops it unread
                return []
            return self._parts(src, resp, cap)

    def _parts(self, src: RemoteSource, resp: Any, cap: int) -> list[tuple[int, bytes]]:
        self._check(resp)
        self._same_file(resp)
        ctype = resp.headers.get("content-type") or ""
        m = re.search(r"boundary=\"?([^\";]+)\"?", ctype)
        if not ctype.lower().startswith("multipart/byteranges") or not m:
            self.multirange = False  # one range for many: no gain in asking so again
            cr = _CONTENT_RANGE.match(resp.headers.get("content-range") or "")
            if not cr:
                raise RemoteError(self.label, "the server answered a range request without a usable Content-Range")
            a, b = int(cr.group(1)), int(cr.group(2))
            self._range(resp, a, b + 1)
            body = _read_capped(resp.iter_bytes(), b + 1 - a, self.label)
            src.transfer.add(len(body))
            return [(a, body)]
        self.multirange = True
        raw = bytearray()
        for chunk in resp.iter_bytes():
            raw += chunk
            if len(raw) > cap:
                raise RemoteError(self.label, f"the server sent more than {cap} bytes for the ranges asked for")
        src.transfer.add(len(raw))
        return multipart_ranges(bytes(raw), m.group(1).encode(), self.size, self.label)

    def fetch(self, src: RemoteSource, start: int, end: int) -> bytes:
        return self._get(src, start, end)

    def stream(self, src: RemoteSource) -> None:
        self._get(src, 0, None)


class Fsspec:
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
        self.pins = dict(NO_PINS)

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
        etag = info.get("ETag") or info.get("etag")
        self.validator = etag or info.get("mtime") or info.get("LastModified")
        if isinstance(etag, str):
            self.pins["etag"] = etag
        if self.size == 0:
            raise TruncatedFileError(self.label, "the file is empty (0 bytes)")
        return self.fetch(src, 0, min(cfg.HEAD_BYTES, self.size))

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
                n = min(cfg.BIG_STEP, self.size - pos)
                yield self.fetch(src, pos, pos + n)
                pos += n

        src.whole_from(chunks(), self.size, None, counted=True)

    def recheck(self) -> None:
        info = self._info()
        now = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        if int(info.get("size") or 0) != self.size or now != self.validator:
            raise RemoteError(self.label, "the file changed while it was read")


def multipart_ranges(body: bytes, boundary: bytes, size: int, label: str) -> list[tuple[int, bytes]]:
    """The parts of a ``multipart/byteranges`` body as (offset, bytes). Each part's length comes from
    its ``Content-Range``, never from searching for the boundary (tensor bytes may hold it).

    Raises:
        RemoteError: a malformed body, a part outside the file or of another total length.
    """
    def bad(why: str) -> RemoteError:
        return RemoteError(label, f"the server's multipart/byteranges answer is malformed ({why})")

    delim = b"--" + boundary
    pos = body.find(delim)
    if pos < 0:
        raise bad("no boundary")
    out: list[tuple[int, bytes]] = []
    while True:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return out
        if body[pos : pos + 2] != b"\r\n":
            raise bad("a boundary line does not end")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0 or head_end - pos > 4096:
            raise bad("part headers do not end")
        m = None
        for line in body[pos + 2 : head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                m = _CONTENT_RANGE.match(value.decode("latin-1"))
        if m is None or m.group(3) == "*":
            raise bad("a part has no usable Content-Range")
        a, b, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if total != size or not 0 <= a <= b < size:
            raise RemoteError(label, f"the server sent a part {a}-{b} of a {total}-byte file; the file has {size} bytes")
        start = head_end + 4
        data = body[start : start + b + 1 - a]
        if len(data) != b + 1 - a:
            raise bad("a part is cut short")
        out.append((a, data))
        pos = start + len(data) + 2
        if not body.startswith(b"\r\n" + delim, start + len(data)):
            raise bad("a part is not followed by the boundary: its length differs from its Content-Range")


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


def backend_for(url: str) -> Http | Fsspec:
    scheme = url.split("://", 1)[0].lower()
    page = hub_page(url) if scheme in ("http", "https") else None
    if scheme in ("http", "https") and page is None:
        return Http(url, url, {"User-Agent": _user_agent()})
    if scheme == "hf" or page is not None:
        hp = page or parse_hf(url)
        if hp.path is None:
            raise UsageError(url, "names a repository, not a file", "Add the file's path, or scan the repository "
                                                                     "(scan expands it to its model files)")
        hub = _hub()
        target = hub.hf_hub_url(hp.repo, hp.path, revision=hp.revision, repo_type=hp.repo_type,
                                endpoint=_hf_endpoint())
        headers = dict(hub.utils.build_hf_headers(library_name="modelkit", library_version=_version()))
        return Http(target, url, headers, hp)
    return Fsspec(url)


def _version() -> str:
    from .._version import __version__

    return __version__


def _user_agent() -> str:
    return f"modelkit/{_version()}"



class StreamReader:
    """``readinto`` over a response body, checked against the file's length (no temporary file)."""

    def __init__(self, chunks: Iterable[bytes], size: int, label: str):
        self._it = iter(chunks)
        self._left = b""
        self.size = size
        self.read_so_far = 0
        self.label = label
        #: what the server says the file is (``Http.pins``); the Hub's ``sha256`` is checked by ``hash``
        self.pins: dict[str, str | None] = {}

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
    backend = backend_for(url)
    if isinstance(backend, Fsspec):
        size = int(backend._info().get("size") or 0)

        def chunks() -> Iterator[bytes]:
            with backend.fs.open(backend.fspath, "rb", block_size=cfg.BIG_STEP) as f:
                while True:
                    c = f.read(cfg.BIG_STEP)
                    if not c:
                        return
                    yield c

        yield StreamReader(chunks(), size, url)
        return
    with backend._response(dict(backend.headers)) as resp:
        backend._check(resp)
        if int(resp.status_code) != 200:
            raise RemoteError(url, f"the server answered a plain GET with HTTP {resp.status_code}")
        length = resp.headers.get("content-length")
        if not (length and length.isdigit()):
            raise RemoteError(url, "the server does not say how long the file is (no Content-Length)")
        backend.validator = backend._validator(resp)
        backend._pin(resp)
        reader = StreamReader(resp.iter_bytes(cfg.BIG_STEP), int(length), url)
        reader.pins = dict(backend.pins)
        yield reader
