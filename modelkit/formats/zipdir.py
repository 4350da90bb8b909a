"""Our own zip central-directory parser (zip64 aware), for reading members in place.

``zipfile`` would do, but we need what it hides: the local header's own name and sizes, the
exact data offset of every member, and every inconsistency (a scanner must see them, because
torch ignores several of them). Nothing is extracted; members are byte ranges in the file.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..errors import FormatError, ResourceLimitError, TruncatedFileError
from ..model import Source

EOCD_SIG = b"PK\x05\x06"
EOCD64_SIG = b"PK\x06\x06"
LOC64_SIG = b"PK\x06\x07"
CEN_SIG = b"PK\x01\x02"
LOC_SIG = b"PK\x03\x04"
MAX_ENTRIES = 1_000_000
MAX_INFLATE = 512 * 1024 * 1024


@dataclass(frozen=True)
class ZipEntry:
    """One member as the central directory and its local header describe it."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int
    local_name: str
    local_method: int
    local_flags: int

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 1 or self.local_flags & 1)

    @property
    def data_end(self) -> int:
        return self.data_offset + self.compressed_size


@dataclass
class ZipDirectory:
    entries: list[ZipEntry]
    by_name: dict[str, ZipEntry]
    duplicates: list[str]
    cd_offset: int
    notes: list[str]

    def lookup(self, name: str) -> ZipEntry | None:
        """Find a member the way torch's miniz does: names compared without regard to case."""
        hit = self.by_name.get(name)
        if hit is not None:
            return hit
        low = name.lower()
        for e in self.entries:
            if e.name.lower() == low:
                return e
        return None


def is_zip(head: bytes) -> bool:
    return head[:4] in (LOC_SIG, EOCD_SIG)


def _find_eocd(path: str, src: Source) -> tuple[int, bytes, list[str]]:
    """The end record torch (miniz) and zipfile both use: the LAST signature in the tail.

    Returns (offset, record, notes); notes name anything a careful reader would stop at: a
    second end record (one hidden in the comment) or bytes after the record's comment.
    """
    size = src.size
    tail_len = min(size, 22 + 65535)
    tail = src.pread(tail_len, size - tail_len)
    pos = tail.rfind(EOCD_SIG)
    if pos < 0 or pos + 22 > len(tail):
        raise TruncatedFileError(path, "the zip archive has no end-of-central-directory record (truncated or not a zip)")
    notes: list[str] = []
    (comment_len,) = struct.unpack("<H", tail[pos + 20 : pos + 22])
    if pos + 22 + comment_len != len(tail):
        notes.append("the end record's comment length does not match the end of the file")
    if tail.rfind(EOCD_SIG, 0, pos) >= 0:
        notes.append("the archive has more than one end-of-central-directory record")
    return size - tail_len + pos, tail[pos : pos + 22], notes


def read_directory(path: str, src: Source) -> ZipDirectory:
    """Parse the central directory and every local header."""
    eocd_at, eocd, notes = _find_eocd(path, src)
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _ = struct.unpack("<IHHHHIIH", eocd)
    if n_total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        if eocd_at < 20:
            raise FormatError(path, "the zip64 locator is missing")
        loc = src.pread(20, eocd_at - 20)
        if loc[:4] != LOC64_SIG:
            raise FormatError(path, "the zip64 locator is missing")
        (rec_at,) = struct.unpack("<Q", loc[8:16])
        if rec_at + 56 > src.size:
            raise TruncatedFileError(path, "the zip64 end record lies past the end of the file")
        rec = src.pread(56, rec_at)
        if rec[:4] != EOCD64_SIG:
            raise FormatError(path, "the zip64 end record is missing")
        n_total, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
    if disk or cd_disk:
        raise FormatError(path, "multi-part zip archives are not supported")
    if n_total > MAX_ENTRIES:
        raise ResourceLimitError(path, f"the zip archive claims {n_total} members")
    if cd_offset + cd_size > src.size:
        raise TruncatedFileError(path, "the zip central directory lies past the end of the file")
    cd = src.pread(cd_size, cd_offset)
    entries: list[ZipEntry] = []
    by_name: dict[str, ZipEntry] = {}
    duplicates: list[str] = []
    p = 0
    for _ in range(n_total):
        if cd[p : p + 4] != CEN_SIG or p + 46 > len(cd):
            raise FormatError(path, "the zip central directory is corrupt")
        (flags, method, _t, _d, crc, csize, usize, nlen, elen, clen, _dk, _ia, _ea, hoff) = struct.unpack(
            "<HHHHIIIHHHHHII", cd[p + 8 : p + 46]
        )
        name_raw = cd[p + 46 : p + 46 + nlen]
        extra = cd[p + 46 + nlen : p + 46 + nlen + elen]
        p += 46 + nlen + elen + clen
        if p > len(cd):
            raise FormatError(path, "the zip central directory is corrupt")
        usize, csize, hoff = _zip64_extra(extra, usize, csize, hoff)
        name = name_raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if hoff + 30 > src.size:
            raise TruncatedFileError(path, f"zip member {name!r} starts past the end of the file")
        local = src.pread(30, hoff)
        if local[:4] != LOC_SIG:
            raise FormatError(path, f"zip member {name!r} has no local header")
        lflags, lmethod = struct.unpack("<HH", local[6:10])
        lnlen, lelen = struct.unpack("<HH", local[26:30])
        lname_raw = src.pread(lnlen, hoff + 30) if hoff + 30 + lnlen <= src.size else b""
        lname = lname_raw.decode("utf-8" if lflags & 0x800 else "cp437", "replace")
        data_offset = hoff + 30 + lnlen + lelen
        if data_offset + csize > src.size:
            raise TruncatedFileError(
                path, f"zip member {name!r} ends at byte {data_offset + csize}, past the end of the file ({src.size})"
            )
        entry = ZipEntry(name, method, flags, crc, csize, usize, hoff, data_offset, lname, lmethod, lflags)
        entries.append(entry)
        if name in by_name:
            duplicates.append(name)
        else:
            by_name[name] = entry
    return ZipDirectory(entries, by_name, duplicates, cd_offset, notes)


def _zip64_extra(extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
    p = 0
    while p + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[p : p + 4])
        body = extra[p + 4 : p + 4 + size]
        if tag == 1:
            q = 0
            if usize == 0xFFFFFFFF and q + 8 <= len(body):
                (usize,) = struct.unpack("<Q", body[q : q + 8])
                q += 8
            if csize == 0xFFFFFFFF and q + 8 <= len(body):
                (csize,) = struct.unpack("<Q", body[q : q + 8])
                q += 8
            if hoff == 0xFFFFFFFF and q + 8 <= len(body):
                (hoff,) = struct.unpack("<Q", body[q : q + 8])
        p += 4 + size
    return usize, csize, hoff


def read_member(path: str, src: Source, entry: ZipEntry, limit: int = MAX_INFLATE) -> bytes:
    """The member's uncompressed bytes (stored or deflated), bounded by ``limit``."""
    if entry.encrypted:
        raise FormatError(path, f"zip member {entry.name!r} is encrypted")
    if entry.size > limit:
        raise ResourceLimitError(path, f"zip member {entry.name!r} claims {entry.size} bytes")
    raw = src.pread(entry.compressed_size, entry.data_offset)
    if entry.method == 0:
        return raw
    if entry.method == 8:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise FormatError(path, f"zip member {entry.name!r} is corrupt ({exc})") from None
        if len(out) > limit:
            raise ResourceLimitError(path, f"zip member {entry.name!r} inflates past {limit} bytes")
        return out
    raise FormatError(path, f"zip member {entry.name!r} uses compression method {entry.method}, which is not supported")


def torch_prefix(zd: ZipDirectory) -> str | None:
    """The folder torch reads from: the first member's top folder (with its slash), or None."""
    if not zd.entries or "/" not in zd.entries[0].name:
        return None
    return zd.entries[0].name.split("/", 1)[0] + "/"


def anomalies(zd: ZipDirectory, prefix: str | None, allow_compressed: bool = False) -> list[tuple[str, str]]:
    """Every inconsistency a loader could resolve differently from us: ``(member, problem)``.

    Args:
        prefix: the archive's single top folder (``"archive/"``), or ``None`` to skip that check.
        allow_compressed: deflated members are normal (``.npz``); torch never writes them.
    """
    out: list[tuple[str, str]] = [("(archive)", note) for note in zd.notes]
    for name in zd.duplicates:
        out.append((name, "the name appears twice in the archive"))
    lowered: dict[str, str] = {}
    for e in zd.entries:
        first = lowered.setdefault(e.name.lower(), e.name)
        if first != e.name:
            out.append((e.name, f"its name differs only in case from {first!r}; torch cannot tell them apart"))
        if e.name != e.local_name:
            out.append((e.name, f"its local header calls it {e.local_name!r}"))
        if e.encrypted:
            out.append((e.name, "it is encrypted"))
        if e.method != e.local_method:
            out.append((e.name, "its local and central headers disagree on compression"))
        if prefix is not None and not e.name.startswith(prefix):
            out.append((e.name, f"it lies outside the archive's top folder {prefix!r}"))
        if not allow_compressed and e.method != 0:
            out.append((e.name, f"it is compressed (method {e.method}); torch never writes compressed members"))
        if e.name.startswith("/") or ".." in e.name.split("/"):
            out.append((e.name, "its name escapes the archive"))
        if prefix is not None and e.name.lower() == f"{prefix}data.pkl".lower() and e.name != f"{prefix}data.pkl":
            out.append((e.name, "torch reads it as data.pkl, though its name differs in case"))
    spans = sorted((e.header_offset, e.data_end, e.name) for e in zd.entries)
    for (_a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            out.append((bn, f"it overlaps member {an!r}"))
    for e in zd.entries:
        if e.data_end > zd.cd_offset:
            out.append((e.name, "its data runs into the central directory"))
    return out
