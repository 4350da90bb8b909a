"""Reading zip members the way torch's ``getRecord`` reads them, streamed under a budget.

torch's build of miniz (``mz_zip_reader_extract_to_mem``, CRC checks compiled out) takes sizes
from the central directory and the data from right after the *local* header's name and extra
field. Stored data is read as is. Deflated data is inflated into a buffer of exactly the
recorded size: a longer stream is cut there without an error, a shorter one is an error, and a
corrupt or cut-short stream leaves the rest of the buffer uninitialised, again without an error.
Each of these is reported as a problem here; the whole stream is always what is returned, since
it is every other reader's view and a superset of torch's.

Inflation streams through ``InflateBudget``: a zip bomb costs bounded memory and time and ends
in ``ResourceLimitError`` ("exceeds a resource bound").
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import FormatError, ResourceLimitError, TruncatedFileError
from ..model import Source

if TYPE_CHECKING:
    from .zipdir import ZipEntry

MAX_WHOLE = 1 << 30  # a member read whole (data.pkl, byteorder...) may not claim more than this
INFLATE_BUDGET = 64 << 20  # inflated bytes one scan, or one open, may produce in all, at most
INFLATE_FLOOR = 32 << 20  # ... and at least, whatever the file's size
INFLATE_RATIO = 64  # ... and otherwise this many times the file's size (deflate reaches about 1,000)
IN_CHUNK = 1 << 16
OUT_CHUNK = 1 << 20


class InflateBudget:
    """Bytes that inflating members may still produce, across one scan or one open."""

    def __init__(self, limit: int = INFLATE_BUDGET) -> None:
        self.limit = limit
        self.left = limit
        self.reported = False  # a scanner has reported the budget running out

    @classmethod
    def for_file(cls, size: int) -> InflateBudget:
        """The budget of one scan or open of a file of ``size`` bytes: in proportion to it, bounded."""
        return cls(min(INFLATE_BUDGET, max(INFLATE_FLOOR, INFLATE_RATIO * size)))

    def charge(self, path: str, member: str, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ResourceLimitError(path, f"zip member {member!r} inflates past {self.limit >> 20} MiB, all that "
                                           "reading this file may inflate: the archive exceeds a resource bound")


@dataclass
class MemberBytes:
    """A member's bytes, and every way they may differ from what torch or zipfile would read."""

    data: bytes
    problems: list[str]


def _check_readable(path: str, src: Source, e: ZipEntry) -> None:
    if e.encrypted or (e.flags | e.local_flags) & 0x20:
        raise FormatError(path, f"zip member {e.name!r} is encrypted or patch data, which torch cannot read")
    if e.method not in (0, 8):
        raise FormatError(path, f"zip member {e.name!r} uses compression method {e.method}, which torch cannot read")
    if e.data_end > src.size:
        raise TruncatedFileError(path, f"zip member {e.name!r} ends past the end of the file")


class Inflater:
    """Streams a deflated member's bytes under a budget; after ``pieces`` ends, ``eof`` says whether
    the deflate stream ended and ``broken`` why it stopped early (corrupt or cut short)."""

    def __init__(self, path: str, src: Source, e: ZipEntry, budget: InflateBudget) -> None:
        self.path, self.src, self.e, self.budget = path, src, e, budget
        self.eof = False
        self.broken: str | None = None

    def pieces(self, stop_at: int) -> Iterator[bytes]:
        self.budget.charge(self.path, self.e.name, 0)  # a spent budget stops here, not with silence
        d = zlib.decompressobj(-15)
        e, done = self.e, 0
        pos, left = e.data_offset, e.compressed_size
        while not d.eof and done < stop_at:
            feed = d.unconsumed_tail
            if not feed and left > 0:
                feed = self.src.pread(min(IN_CHUNK, left), pos)
                pos += len(feed)
                left -= len(feed)
            try:
                piece = d.decompress(feed, min(OUT_CHUNK, stop_at - done))
            except zlib.error as exc:
                self.broken = f"its deflate stream is corrupt ({exc})"
                return
            if not piece and not feed:
                self.broken = "its deflate stream is cut short"
                return
            self.budget.charge(self.path, e.name, len(piece))
            done += len(piece)
            yield piece
        self.eof = d.eof


def inflate(path: str, src: Source, e: ZipEntry, budget: InflateBudget, stop_at: int) -> tuple[bytes, bool, str | None]:
    """Inflate a deflated member, streaming, up to ``stop_at`` output bytes.

    Returns:
        (bytes, whether the deflate stream ended, why it stopped early: corrupt or cut short).
    """
    inf = Inflater(path, src, e, budget)
    data = b"".join(inf.pieces(stop_at))
    return data, inf.eof, inf.broken


def iter_member(path: str, src: Source, e: ZipEntry, budget: InflateBudget) -> Iterator[bytes]:
    """The member's bytes in pieces (inflated if deflated), never all in memory at once."""
    _check_readable(path, src, e)
    if e.method == 0:
        for off in range(0, e.compressed_size, IN_CHUNK):
            yield src.pread(min(IN_CHUNK, e.compressed_size - off), e.data_offset + off)
        return
    yield from Inflater(path, src, e, budget).pieces(budget.left + 1)


def contains(path: str, src: Source, e: ZipEntry, needle: bytes, budget: InflateBudget) -> bool:
    """Whether the member's bytes hold ``needle`` (streamed, so any size is cheap in memory)."""
    keep = b""
    for piece in iter_member(path, src, e, budget):
        window = keep + piece
        if needle in window:
            return True
        keep = window[-(len(needle) - 1):] if len(needle) > 1 else b""
    return False


def member_bytes(path: str, src: Source, e: ZipEntry, budget: InflateBudget, upto: int | None = None) -> MemberBytes:
    """The whole member, as far as the budget allows, with each way torch's own read differs.

    torch reads ``size`` bytes (the central directory's): stored data as is; deflated data
    inflated into a buffer of that size, silently cut when the stream is longer, refused when it
    ends short, and left partly uninitialised when the stream is corrupt. Here the whole stream
    is returned (a superset of every reader's view), and each such difference is a problem.
    ``upto`` stops inflating there (a reader that only needs to know the stream is too long).

    Raises:
        FormatError: torch cannot read the member at all (encrypted, unknown method, past the end).
        ResourceLimitError: the budget ran out.
    """
    _check_readable(path, src, e)
    problems: list[str] = []
    if e.is_folder and e.size:
        problems.append("torch reads it as a folder entry and hands back uninitialised memory")
    if e.compressed_size == 0:
        if e.size:
            problems.append(f"it records {e.size} bytes but stores none")
        return MemberBytes(b"", problems)
    if e.method == 0:
        if e.size != e.compressed_size:
            problems.append(f"its sizes disagree ({e.compressed_size} stored, {e.size} recorded)")
        return MemberBytes(src.pread(e.compressed_size, e.data_offset), problems)
    data, ended, broken = inflate(path, src, e, budget, budget.left + 1 if upto is None else upto)
    if broken:
        problems.append(f"{broken}; torch reads uninitialised memory after byte {len(data)}")
    elif len(data) > e.size:
        got = f"{len(data)} bytes" if ended else f"more than {e.size} bytes"
        problems.append(f"it inflates to {got}, but the directory records {e.size}; torch reads only the first ones")
    elif ended and len(data) < e.size:
        problems.append(f"it inflates to {len(data)} bytes, fewer than the {e.size} the directory records")
    elif ended and zlib.crc32(data) != e.crc:
        problems.append("its CRC-32 does not match its bytes (torch ignores that, zipfile refuses it)")
    return MemberBytes(data, problems)


def member_head(path: str, src: Source, e: ZipEntry, n: int, budget: InflateBudget) -> bytes:
    """The member's first ``n`` bytes (inflated if deflated); fewer if it is shorter."""
    _check_readable(path, src, e)
    if e.method == 0:
        return src.pread(min(n, e.compressed_size), e.data_offset)
    return inflate(path, src, e, budget, n)[0]


def read_member(path: str, src: Source, entry: ZipEntry, limit: int = MAX_WHOLE,
                budget: InflateBudget | None = None) -> bytes:
    """The member's bytes exactly as torch reads them, or an error if any reader could read others.

    Raises:
        ResourceLimitError: it claims more than ``limit`` bytes or inflates past the budget.
        FormatError: it cannot be read, or its bytes are not what the directory records.
    """
    if entry.size > limit:
        raise ResourceLimitError(path, f"zip member {entry.name!r} claims {entry.size} bytes")
    got = member_bytes(path, src, entry, budget or InflateBudget(min(limit, INFLATE_BUDGET)), entry.size + 1)
    if got.problems:
        raise FormatError(path, f"zip member {entry.name!r} cannot be read reliably: {got.problems[0]}")
    return got.data


def inflate_exact(source: Source, offset: int, csize: int, size: int, crc: int) -> bytes:
    """A deflated member's bytes for a tensor read (``TensorRef.compressed``): exactly ``size`` bytes
    matching ``crc``, inflated with a cap of ``size + 1`` so a member that lies about its size costs
    no more memory than it claims.

    Raises:
        FormatError: the stream is corrupt, or its bytes do not match the recorded size and CRC-32.
    """
    d = zlib.decompressobj(-15)
    out = bytearray()
    pos, left = offset, csize
    while not d.eof and len(out) <= size:
        feed = d.unconsumed_tail
        if not feed and left > 0:
            feed = source.pread(min(IN_CHUNK, left), pos)
            pos += len(feed)
            left -= len(feed)
        try:
            piece = d.decompress(feed, size + 1 - len(out))
        except zlib.error as exc:
            raise FormatError(source.path, f"a compressed member is corrupt ({exc})") from None
        if not piece and not feed:
            break
        out += piece
    if len(out) != size or not d.eof or zlib.crc32(out) != crc:
        raise FormatError(source.path, "a compressed member is corrupt (its bytes do not match the size and "
                                       "CRC-32 the archive records)")
    return bytes(out)
