"""Remote model files read by byte ranges: ``https://`` URLs, ``hf://`` paths and any fsspec URL.

A scan needs few of a file's bytes: a safetensors header, or a torch zip's end records, central
directory, local headers and pickles (about 1 MB of a 2 GB checkpoint). ``source.RemoteSource`` is a
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

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import MissingExtraError, RemoteError, UsageError

#: Bytes asked for at least, per request: one local header, its name and a member's first bytes.
MIN_FETCH = 512
#: Reads at least this big bypass the cache (tensor data, a hash): fetched in ``BIG_STEP`` pieces.
BIG_READ = 1 << 20
BIG_STEP = 16 << 20
#: Announced spans closer than this are fetched as one request.
MERGE_GAP = 2048
#: Extra bytes one batch of announced spans may fetch to save requests (at most 1/4096 of the file).
MERGE_BUDGET = 768 << 10
#: What the span cache holds at most.
CACHE_BYTES = 64 << 20
#: The first request asks for this much (a safetensors header usually fits).
HEAD_BYTES = 64 << 10
#: Spans asked for in one request, where the server answers ``multipart/byteranges`` (Apache's
#: default limit is 200 ranges a request).
RANGES_PER_REQUEST = 100
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


def hub_sha_mismatch(label: str, claim: str, got: str) -> RemoteError:
    """The error for bytes that do not hash to the SHA-256 the Hub gives for the file."""
    return RemoteError(label, f"the Hub gives the file's SHA-256 as {claim}, but the bytes it sent hash to {got}",
                       "Do not use this download; try again later")


# -- hf:// paths ------------------------------------------------------------------------------------


#: A commit id, as the Hub gives it (``X-Repo-Commit``, a repository's ``sha``).
COMMIT = re.compile(r"[0-9a-f]{40}")
#: What names the bytes a remote read got, before anything is said: the server's ETag; for the Hub,
#: the commit and the file's SHA-256 (``Http.pins``).
NO_PINS: dict[str, str | None] = {"etag": None, "commit": None, "sha256": None}
#: Revisions with slashes in them (a pull request's, a dataset's parquet conversion), kept whole.
_SPECIAL_REFS = r"refs/(?:pr/\d+|convert/[\w-]+)"
#: ``hf://`` prefixes of repositories that are not models (as huggingface_hub's ``HfFileSystem`` writes them).
REPO_TYPES = {"datasets": "dataset", "spaces": "space"}


@dataclass(frozen=True)
class HfPath:
    """``hf://[datasets/|spaces/]ORG/REPO[@REV][/PATH]``: a file, or with no path every model file of
    the repo (``repo_type``: ``model``, ``dataset`` or ``space``)."""

    repo: str
    revision: str | None
    path: str | None
    repo_type: str = "model"

    def url(self) -> str:
        kind = next((k + "/" for k, v in REPO_TYPES.items() if v == self.repo_type), "")
        return (f"hf://{kind}{self.repo}{'@' + self.revision if self.revision else ''}"
                f"{'/' + self.path if self.path else ''}")


def parse_hf(url: str) -> HfPath:
    """Split an ``hf://`` path; ``@refs/pr/N`` revisions are kept whole; ``hf://datasets/...`` and
    ``hf://spaces/...`` name a dataset's or a Space's repository.

    Raises:
        UsageError: not ``hf://ORG/REPO...``.
    """
    rest = url[len("hf://"):] if url.lower().startswith("hf://") else ""
    repo_type = "model"
    kind, _, after = rest.partition("/")
    if kind in REPO_TYPES and after.count("/") >= 1:
        repo_type, rest = REPO_TYPES[kind], after
    m = re.match(r"^([^/@\s]+)/([^/@\s]+)(?:@(" + _SPECIAL_REFS + r"|[^/\s]+))?(?:/(.+))?$", rest)
    if not m:
        raise UsageError(url, "is not an hf:// path: write hf://ORG/REPO[@REVISION][/PATH] "
                              "(hf://datasets/ORG/REPO... for a dataset)")
    rev = unquote(m.group(3)) if m.group(3) else None  # @refs%2Fpr%2F3 as HfFileSystem writes it
    return HfPath(f"{m.group(1)}/{m.group(2)}", rev, _repo_path(url, m.group(4)), repo_type)


def _repo_path(url: str, path: str | None) -> str | None:
    if path is not None and not _plain(path):
        raise UsageError(url, "the path inside the repository is not a plain relative path")
    return path or None


def _plain(path: str) -> bool:
    """A relative path inside a repository that stays inside it."""
    return not path.startswith("/") and ".." not in path.split("/")


def hub_page(url: str) -> HfPath | None:
    """A Hub web address of a file (``https://huggingface.co/ORG/REPO/blob/REV/PATH``, what a
    browser shows, or ``.../resolve/REV/PATH``; datasets and Spaces too) as the file it names, so it
    is read like ``hf://`` (the file, not the web page; the token and the commit as for ``hf://``).
    None for any other URL, and for hosts other than the Hub's (``HF_ENDPOINT``)."""
    try:
        u, hub = urlsplit(url), urlsplit(_hf_endpoint())
    except ValueError:  # not a URL at all ('https://[::1/x'): the request says so, in one line
        return None
    if u.scheme.lower() not in ("http", "https") or (u.scheme.lower(), u.netloc.lower()) != \
            (hub.scheme.lower(), hub.netloc.lower()):
        return None  # a query (?download=true) changes nothing the Hub sends
    base = hub.path.rstrip("/")
    if not u.path.startswith(base + "/"):
        return None
    m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/(?:blob|resolve)/(" + _SPECIAL_REFS + r"|[^/]+)/(.+)$",
                 u.path[len(base):])
    if not m:
        return None
    path = unquote(m.group(4))
    if not _plain(path):
        return None
    return HfPath(m.group(2), unquote(m.group(3)), path, REPO_TYPES.get(m.group(1) or "", "model"))


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def expand(paths: Iterable[str], extensions: Sequence[str]) -> Iterator[str]:
    """Each remote path as given, except ``hf://ORG/REPO[@REV]``: its model files, one path each, at
    the commit the revision is at (``hf://ORG/REPO@COMMIT/PATH``).

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
        commit, names = _list_repo(hp, p)
        for name in names:
            if name.lower().endswith(tuple(extensions)):
                yield HfPath(hp.repo, commit, name, hp.repo_type).url()


def _list_repo(hp: HfPath, label: str) -> tuple[str | None, list[str]]:
    """The commit the revision is at, and the repository's files at that commit: every file of a
    repository scan is then read at the one commit, whatever is pushed meanwhile (each path names it)."""
    hub = _hub()
    try:
        api = hub.HfApi(endpoint=_hf_endpoint())
        sha = getattr(api.repo_info(hp.repo, revision=hp.revision, repo_type=hp.repo_type), "sha", None)
        commit = sha if isinstance(sha, str) and COMMIT.fullmatch(sha) else hp.revision
        return commit, sorted(api.list_repo_files(hp.repo, revision=commit, repo_type=hp.repo_type))
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
        from .http import Fsspec

        Fsspec(url)


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


