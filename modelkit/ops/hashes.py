"""The hashes users look up, computed in one streaming pass per file.

* ``sha256``: the whole file.
* ``autov1``: A1111's legacy hash: sha256 of the 64 KiB window at 1 MiB, 8 hex digits.
* ``autov2``: the first 10 hex digits of sha256 (A1111's "model hash", Civitai's AutoV2).
* ``autov3``: sha256 of everything after the safetensors header (kohya's "addnet" hash; Civitai
  shows 12 hex digits). Only for safetensors files.
* ``crc32``: zlib's CRC-32, 8 hex digits.
* ``blake3``: when the ``blake3`` package is installed (Civitai lists it).

``check`` compares the hashes a file carries in its metadata (``sshs_model_hash``,
``sshs_legacy_hash``, ``modelspec.hash_sha256``) with the computed ones. Real files often carry
stale ones, for example after their metadata was edited.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import portable
from ..errors import FormatError, InputNotFoundError, RemoteError
from ..formats.sniff import check_file
from ..remote import is_remote
from . import hashcache

ALGOS = ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3")
DEFAULT_ALGOS = ("sha256", "autov1", "autov2", "autov3", "crc32")
CHUNK = 8 * 1024 * 1024
V1_START, V1_LEN = 0x100000, 0x10000


@dataclass(frozen=True)
class HashCheck:
    key: str
    embedded: str
    computed: str | None
    ok: bool | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "embedded": self.embedded, "computed": self.computed, "ok": self.ok,
                "note": self.note}


@dataclass(frozen=True)
class HashResult:
    path: str
    size: int
    hashes: dict[str, str]
    checks: tuple[HashCheck, ...] = field(default=())
    #: the hashes came from the hash cache (``hashcache``), not from reading the file
    cached: bool = False
    #: set by ``check`` when the metadata carry no hash to compare (``NO_EMBEDDED``)
    check_note: str = ""

    @property
    def mismatches(self) -> int:
        return sum(1 for c in self.checks if c.ok is False)

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "size": self.size, "hashes": dict(self.hashes),
               "checks": [c.to_dict() for c in self.checks], "cached": self.cached}
        if self.check_note:
            out["check_note"] = self.check_note
        return out


def blake3_available() -> bool:
    try:
        import blake3  # noqa: F401
    except ImportError:
        return False
    return True


def _safetensors_data_start(head: bytes, size: int) -> int | None:
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n if 8 + n <= size else None


def hash_file(path: str | os.PathLike[str], algos: tuple[str, ...] = DEFAULT_ALGOS,
              progress: Callable[[int], None] | None = None, *, use_cache: bool = True) -> HashResult:
    """Compute the requested hashes in one read of the file.

    Args:
        path: the file.
        algos: any of ``ALGOS``; ``blake3`` needs the ``blake3`` package.
        progress: called with the number of bytes read after each chunk.
        use_cache: take the hashes from the hash cache (``hashcache``) when the file is known
            there unchanged; False reads the file again (the result is cached either way).

    Returns:
        A HashResult with lowercase hex digests, shortened the way A1111 and Civitai show them.

    Raises:
        FormatError: an unknown algorithm, a missing optional package, or a read error.
        InputNotFoundError, NotAFileError: the path is missing, or a folder, FIFO or device.

    Example:
        >>> modelkit.hash_file("model.safetensors").hashes["autov2"]  # doctest: +SKIP
        '6ce0161689'
    """
    p = os.fspath(path)
    for a in algos:
        if a not in ALGOS:
            raise FormatError(None, f"unknown hash {a!r}", f"Choose from {', '.join(ALGOS)}")
    if "blake3" in algos and not blake3_available():
        raise FormatError(None, "the blake3 hash needs the blake3 package", "Run: pip install blake3")
    if is_remote(p):
        return _hash_remote(p, algos, progress)
    check_file(p)
    try:
        f = open(p, "rb", buffering=0)  # noqa: SIM115 - closed below; an OSError here is the user's
    except OSError as exc:
        raise InputNotFoundError(p, f"cannot be read ({exc.strerror or exc})") from None
    with f:
        before = os.fstat(f.fileno())  # the file opened: the identity the cache is keyed by
        size = before.st_size
        hit = hashcache.lookup(before, algos) if use_cache else None
        if hit is not None:
            if progress is not None:
                progress(size)
            want = {*algos, *(("autov3_full",) if "autov3" in algos else ())}
            return HashResult(p, size, {k: v for k, v in hit.items() if k in want}, cached=True)
        return _hash_open(p, f, before, algos, progress)


def _hash_remote(url: str, algos: tuple[str, ...], progress: Callable[[int], None] | None) -> HashResult:
    """A remote file's hashes: AutoV1 alone from its 64 KiB window (a range request), anything
    else from one stream of the whole file, without a temporary copy."""
    from ..remote import hub_sha_mismatch
    from ..remote.http import open_stream
    from ..remote.source import RemoteSource

    if set(algos) <= {"autov1"}:
        src = RemoteSource(url)
        try:
            window = src.pread(max(0, min(V1_LEN, src.size - V1_START)), V1_START) if src.size > V1_START else \
                src.pread(src.size, 0)
        finally:
            src.close()
        return HashResult(url, src.size, {"autov1": hashlib.sha256(window).hexdigest()[:8]} if algos else {})
    with open_stream(url) as reader:
        claim = reader.pins.get("sha256")  # the Hub's: the stream is checked against it, whatever is asked
        extra = ("sha256",) if claim and "sha256" not in algos else ()
        out = _hash_stream(url, reader, reader.size, (*algos, *extra), progress)
    if claim and out["sha256"] != claim:
        raise hub_sha_mismatch(url, claim, out["sha256"])
    return HashResult(url, reader.size, {k: v for k, v in out.items() if not (extra and k == "sha256")})


def _hash_open(p: str, f: Any, before: os.stat_result, algos: tuple[str, ...],
               progress: Callable[[int], None] | None) -> HashResult:
    """``hash_file`` past the cache: read the open file ``f`` once, every lane beside the read."""
    started = time.time_ns()
    out = _hash_stream(p, f, before.st_size, algos, progress)
    after = os.fstat(f.fileno())
    hashcache.store(p, before, after, started, algos, out)
    return HashResult(p, before.st_size, out)


def _hash_stream(p: str, f: Any, size: int, algos: tuple[str, ...],
                 progress: Callable[[int], None] | None) -> dict[str, str]:
    """Every hash in ``algos`` of what ``f.readinto`` yields, in one pass, every lane beside the read."""
    full = hashlib.sha256() if {"sha256", "autov2"} & set(algos) else None
    v1 = hashlib.sha256() if "autov1" in algos else None
    v3 = hashlib.sha256() if "autov3" in algos else None
    b3: Any = None
    if "blake3" in algos:
        import blake3

        b3 = blake3.blake3()
    state = _Digests(algos, full, v1, v3, b3)
    with _Lanes(state.lanes()) as lanes:
        bufs = [bytearray(CHUNK), bytearray(CHUNK)]
        pos = i = 0
        while True:
            lanes.wait(i)  # the lanes are done with this buffer
            try:
                n = f.readinto(bufs[i])
            except RemoteError:
                raise  # a remote stream says what went wrong itself; it is no disk error
            except OSError as exc:
                raise FormatError(p, f"could not be read at byte {pos:,} ({exc.strerror or exc})",
                                  "Check the disk or copy the file again") from None
            if not n:
                break
            chunk = memoryview(bufs[i])[:n]
            if pos == 0 and v3 is not None:
                state.data_start = _safetensors_data_start(bytes(chunk[:16]), size)
            lanes.submit(i, chunk, pos)
            pos += n
            i ^= 1
            if progress is not None:
                progress(n)
        lanes.wait_all()
    crc, data_start = state.crc, state.data_start
    out: dict[str, str] = {}
    if full is not None:
        digest = full.hexdigest()
        if "sha256" in algos:
            out["sha256"] = digest
        if "autov2" in algos:
            out["autov2"] = digest[:10]
    if v1 is not None:
        out["autov1"] = v1.hexdigest()[:8]
    if v3 is not None and data_start is not None:
        out["autov3"] = v3.hexdigest()[:12]
        out["autov3_full"] = v3.hexdigest()
    if "crc32" in algos:
        out["crc32"] = f"{crc:08x}"
    if b3 is not None:
        out["blake3"] = b3.hexdigest()
    return out


class _Digests:
    """The running hashes of one file, split into lanes that can run side by side."""

    def __init__(self, algos: tuple[str, ...], full: Any, v1: Any, v3: Any, b3: Any):
        self.algos, self.full, self.v1, self.v3, self.b3 = algos, full, v1, v3, b3
        self.crc = 0
        self.data_start: int | None = None

    def lanes(self) -> list[Callable[[memoryview, int], None]]:
        """Functions of (chunk, position); each keeps its hashes in file order when called in order."""
        def whole(chunk: memoryview, pos: int) -> None:
            if self.full is not None:
                self.full.update(chunk)
            if "crc32" in self.algos:
                self.crc = zlib.crc32(chunk, self.crc)

        def parts(chunk: memoryview, pos: int) -> None:
            n = len(chunk)
            if self.v1 is not None:
                lo, hi = max(pos, V1_START), min(pos + n, V1_START + V1_LEN)
                if lo < hi:
                    self.v1.update(chunk[lo - pos : hi - pos])
            if self.v3 is not None and self.data_start is not None and pos + n > self.data_start:
                self.v3.update(chunk[max(0, self.data_start - pos) :])
            if self.b3 is not None:
                self.b3.update(chunk)

        return [whole, parts]


class _Lanes:
    """Run each lane on its own thread (``hashlib``, ``zlib`` and ``blake3`` release the GIL), one
    chunk after another, so a file's sha256 and its AutoV3 (a second sha256 of nearly the same
    bytes) take one core each; with one core, inline."""

    def __init__(self, fns: list[Callable[[memoryview, int], None]]):
        from concurrent.futures import ThreadPoolExecutor

        self.fns = fns
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix="modelkit-hash") for _ in fns] \
            if portable.usable_cpus() > 1 else []
        self.pending: dict[int, list[Any]] = {}

    def __enter__(self) -> _Lanes:
        return self

    def __exit__(self, *exc: object) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, slot: int, chunk: memoryview, pos: int) -> None:
        if not self.pools:
            for fn in self.fns:
                fn(chunk, pos)
            return
        self.pending[slot] = [pool.submit(fn, chunk, pos) for pool, fn in zip(self.pools, self.fns)]

    def wait(self, slot: int) -> None:
        for fut in self.pending.pop(slot, []):
            fut.result()

    def wait_all(self) -> None:
        for slot in list(self.pending):
            self.wait(slot)


NO_EMBEDDED = "no embedded hash to check"


def check(result: HashResult, metadata: dict[str, str]) -> HashResult:
    """Compare embedded hashes with computed ones (needs sha256 and autov3 in ``result``)."""
    checks: list[HashCheck] = []
    h = result.hashes
    emb = metadata.get("sshs_model_hash")
    if emb:
        comp = h.get("autov3_full")
        checks.append(HashCheck("sshs_model_hash", emb, comp, None if comp is None else emb.lower() == comp,
                                "kohya's sha256 of the data after the header"))
    emb = metadata.get("modelspec.hash_sha256")
    if emb:
        comp = h.get("autov3_full")
        value = emb.lower().removeprefix("0x")
        checks.append(HashCheck("modelspec.hash_sha256", emb, comp, None if comp is None else value == comp,
                                "modelspec: sha256 of the data after the header"))
    emb = metadata.get("sshs_legacy_hash")
    if emb:
        checks.append(HashCheck("sshs_legacy_hash", emb, None, None,
                                "kohya hashes a copy of the file with only ss_* metadata; not comparable"))
    return HashResult(result.path, result.size, result.hashes, tuple(checks), result.cached,
                      "" if checks else NO_EMBEDDED)
