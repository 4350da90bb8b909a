"""Our own zip central-directory parser, which reads an archive the way torch's miniz reads it.

``zipfile`` would do, but we need what it hides: the local header's own name and sizes, the
exact data offset of every member, and every inconsistency (a scanner must see them, because
torch ignores several of them). Nothing is extracted; members are byte ranges in the file.

``read_archive`` finds the directory torch reads (``zipend.miniz_end``) and also every other
directory a reader could find (zipfile's, a stray end record's, the classic record next to a
zip64 one). ``read_directory`` returns torch's, with a note for each disagreement; the reader
refuses an archive with notes and the scanner scans every directory.

Members are read as torch's ``getRecord`` reads them, streamed under a budget: see ``zipread``.
"""

from __future__ import annotations

import string
import struct
from dataclasses import dataclass, field

from ..errors import FormatError, ResourceLimitError, TruncatedFileError
from ..model import Source
from .zipend import CEN_SIZE, U32, EndRecord, end_signatures, miniz_end, readings_at, record_notes, zipfile_end
from .zipread import (
    INFLATE_BUDGET,
    InflateBudget,
    MemberBytes,
    contains,
    inflate,
    iter_member,
    member_bytes,
    member_head,
    read_member,
)

EOCD_SIG = b"PK\x05\x06"
CEN_SIG = b"PK\x01\x02"
LOC_SIG = b"PK\x03\x04"
MAX_ENTRIES = 1_000_000
MAX_OTHER_DIRECTORIES = 16
MAX_OTHER_ENTRIES = 100_000
ENCRYPTED = 0x1 | 0x40  # traditional and strong encryption; miniz refuses both, and patch data (0x20)
_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def fold(name: str) -> str:
    """A name as miniz compares it: ASCII letters lowered, nothing else (``MZ_TOLOWER``)."""
    return name.translate(_FOLD)


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
    external_attr: int = 0

    @property
    def encrypted(self) -> bool:
        return bool((self.flags | self.local_flags) & ENCRYPTED)

    @property
    def is_folder(self) -> bool:
        """miniz's ``m_is_directory``: a trailing slash or the DOS folder attribute."""
        return self.name.endswith("/") or bool(self.external_attr & 0x10)

    @property
    def data_end(self) -> int:
        return self.data_offset + self.compressed_size


@dataclass
class ZipDirectory:
    """One central directory: the one torch reads, or another reader's (``label`` says whose).

    ``notes`` are disagreements between readers (the reader refuses, the scanner calls them
    unsafe); ``broken`` are members whose local header cannot be read (torch fails on them).
    """

    entries: list[ZipEntry]
    by_name: dict[str, ZipEntry]
    duplicates: list[str]
    cd_offset: int
    notes: list[str]
    label: str = "torch"
    end: EndRecord | None = None
    broken: list[str] = field(default_factory=list)

    def lookup(self, name: str) -> ZipEntry | None:
        """Find a member the way torch's miniz does: names compared without regard to ASCII case.

        Where two names match, miniz's pick depends on its sorted index; such archives are
        anomalies (``anomalies``), refused by the reader and scanned member by member.
        """
        hit = self.by_name.get(name)
        if hit is not None:
            return hit
        low = fold(name)
        for e in self.entries:
            if fold(e.name) == low:
                return e
        return None


@dataclass
class Archive:
    """Every central directory found in one file."""

    torch: ZipDirectory | None  # the one torch reads, or None when torch cannot open the archive
    error: FormatError | None  # why torch cannot
    others: list[ZipDirectory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limit: ResourceLimitError | None = None  # the search for other directories stopped at a bound


def is_zip(head: bytes) -> bool:
    return head[:4] in (LOC_SIG, EOCD_SIG)


def read_directory(path: str, src: Source) -> ZipDirectory:
    """The central directory torch reads, with a note for every disagreement with other readers.

    Raises:
        FormatError: torch cannot open the archive (its reason, as miniz would give it).
        ResourceLimitError: the file holds more directories or members than any real archive.
    """
    arc = read_archive(path, src)
    if arc.limit is not None:
        raise arc.limit
    if arc.torch is None:
        assert arc.error is not None
        raise arc.error
    return arc.torch


def read_archive(path: str, src: Source) -> Archive:
    """torch's directory and every other directory a zip reader could find in the file.

    Never raises for the file's content: what stops torch is ``error``, a bound hit is ``limit``.
    """
    arc = Archive(None, None)
    same_as_torch: tuple[int, int, int] | None = None  # a reading with these (offset, size, shift) reads torch's
    try:
        end = miniz_end(path, src)
        entries, trailing, broken = _parse(path, src, end, strict=True)
        arc.notes += record_notes(src, end)
        if trailing:
            arc.notes.append(f"the central directory has {trailing} bytes after its {end.count} members; zipfile "
                             "reads them as more members")
        else:
            same_as_torch = (end.cd_offset, end.cd_size, 0)
        arc.torch = _directory(entries, end, arc.notes, "torch", broken)
    except FormatError as exc:  # ResourceLimitError included: torch's directory is too big to take in
        arc.error = exc
        if isinstance(exc, ResourceLimitError):
            arc.limit = exc
            return arc
    try:
        _other_directories(path, src, arc, same_as_torch)
    except ResourceLimitError as exc:
        arc.limit = exc
    return arc


def _other_directories(path: str, src: Source, arc: Archive, same_as_torch: tuple[int, int, int] | None) -> None:
    end = arc.torch.end if arc.torch is not None else None
    seen = {end.key} if end is not None else set()
    found = {_signature(arc.torch.entries)} if arc.torch is not None else set()
    zf = zipfile_end(src)
    if end is not None and zf is None:
        arc.notes.append("zipfile cannot open this archive, which torch reads")
    readings = [zf] if zf is not None else []
    for at in end_signatures(src):
        if end is not None and at > end.eocd_at:
            arc.notes.append(f"another end-of-central-directory signature at byte {at}, after the record torch reads")
        readings += readings_at(src, at)
    room = MAX_OTHER_ENTRIES
    for r in readings:
        if (r.cd_offset, r.cd_size, r.shift) == same_as_torch and (end is None or r.count in (None, end.count)):
            continue  # parsed by size, or by the same count, torch's directory gives torch's members
        if r.key in seen:
            continue
        seen.add(r.key)
        try:
            entries, _, _ = _parse(path, src, r, strict=False, max_entries=room)
        except ResourceLimitError:
            raise ResourceLimitError(path, f"the zip archive's other central directories hold more than "
                                           f"{MAX_OTHER_ENTRIES} members in all: it exceeds a resource bound") from None
        except FormatError:
            if r.reader == "zipfile" and end is not None:
                arc.notes.append("zipfile reads another central directory than torch, and fails on it")
            continue
        if not entries or _signature(entries) in found:
            continue  # no members, or the members of a directory already found
        found.add(_signature(entries))
        room -= len(entries)
        if len(arc.others) == MAX_OTHER_DIRECTORIES:
            raise ResourceLimitError(path, f"the zip archive holds more than {MAX_OTHER_DIRECTORIES} central "
                                           "directories: it exceeds a resource bound")
        if end is not None:
            who = "zipfile" if r.reader == "zipfile" else f"the {r.reader}"
            arc.notes.append(f"{who} points at another central directory than torch reads ({r.describe()})")
        arc.others.append(_directory(entries, r, [], r.reader, []))


def _signature(entries: list[ZipEntry]) -> tuple[tuple[str, int, int, int, int], ...]:
    """What a reader gets from a directory: each member's name, method and bytes."""
    return tuple((e.name, e.method, e.data_offset, e.compressed_size, e.size) for e in entries)


def _directory(entries: list[ZipEntry], end: EndRecord, notes: list[str], label: str,
               broken: list[str]) -> ZipDirectory:
    by_name: dict[str, ZipEntry] = {}
    duplicates: list[str] = []
    for e in entries:
        if e.name in by_name:
            duplicates.append(e.name)
        else:
            by_name[e.name] = e
    return ZipDirectory(entries, by_name, duplicates, end.cd_offset, notes, label, end, broken)


def _parse(path: str, src: Source, end: EndRecord, strict: bool,
           max_entries: int = MAX_ENTRIES) -> tuple[list[ZipEntry], int, list[str]]:
    """The members of one directory, how many directory bytes follow the last one, and the
    problems of members whose local header cannot be read (they are left out).

    ``strict`` applies miniz's checks (torch fails where they fail); otherwise entries are parsed
    as zipfile parses them, until ``count`` or, without a count, until the directory is used up.
    """
    if end.count is not None and end.count > max_entries:
        raise ResourceLimitError(path, f"the zip archive claims {end.count} members")
    cd = src.pread(end.cd_size, end.cd_offset)
    src.prefetch(_local_spans(cd, end.shift, max_entries))
    entries: list[ZipEntry] = []
    broken: list[str] = []
    p = 0
    n = 0
    while (n < end.count) if end.count is not None else (p < len(cd)):
        if n >= max_entries:
            raise ResourceLimitError(path, f"the zip archive has more than {max_entries} members")
        n += 1
        if p + CEN_SIZE > len(cd) or cd[p : p + 4] != CEN_SIG:
            raise FormatError(path, "the zip central directory is corrupt")
        (flags, method, _t, _d, crc, csize, usize, nlen, elen, clen, disk_start, _ia, ext_attr, hoff) = struct.unpack(
            "<HHHHIIIHHHHHII", cd[p + 8 : p + CEN_SIZE])
        total = CEN_SIZE + nlen + elen + clen
        if p + total > len(cd):
            raise FormatError(path, "the zip central directory is corrupt")
        name = cd[p + CEN_SIZE : p + CEN_SIZE + nlen].decode("utf-8" if flags & 0x800 else "cp437", "replace")
        extra = cd[p + CEN_SIZE + nlen : p + CEN_SIZE + nlen + elen]
        p += total
        if not strict or max(usize, csize, hoff) == U32:
            usize, csize, hoff = _zip64_extra(path, name, extra, usize, csize, hoff, strict)
        if strict:
            _miniz_checks(path, src, name, method, flags, csize, usize, hoff, disk_start)
        try:
            entries.append(_local(path, src, name, method, flags, crc, csize, usize, hoff + end.shift, ext_attr))
        except FormatError as exc:
            broken.append(exc.problem)
    return entries, len(cd) - p, broken


def _local_spans(cd: bytes, shift: int, max_entries: int) -> list[tuple[int, int]]:
    """Where each member's local header and first bytes are, as far as the directory says (a
    remote source fetches them all at once instead of one request per member)."""
    out: list[tuple[int, int]] = []
    p = 0
    while p + CEN_SIZE <= len(cd) and cd[p : p + 4] == CEN_SIG and len(out) < max_entries:
        nlen, elen, clen = struct.unpack("<HHH", cd[p + 28 : p + 34])
        (hoff,) = struct.unpack("<I", cd[p + 42 : p + 46])
        if hoff != U32:
            out.append((hoff + shift, 30 + nlen + 128 + 64))
        p += CEN_SIZE + nlen + elen + clen
    return out


def _miniz_checks(path: str, src: Source, name: str, method: int, flags: int, csize: int, usize: int, hoff: int,
                  disk_start: int) -> None:
    """What ``mz_zip_reader_read_central_dir`` refuses (the whole archive, so torch.load fails)."""
    if csize != U32 and usize != U32 and ((method == 0 and usize != csize) or (usize and not csize)):
        raise FormatError(path, f"zip member {name!r} records sizes torch refuses ({csize} compressed, {usize} "
                                f"uncompressed, method {method})")
    if disk_start not in (0, 1):
        raise FormatError(path, "multi-part zip archives are not supported")
    if csize != U32 and hoff + 30 + csize > src.size:
        raise TruncatedFileError(path, f"zip member {name!r} ends past the end of the file")
    if flags & 0x2000:
        raise FormatError(path, "the zip archive masks its local headers (central-directory encryption)")


def _local(path: str, src: Source, name: str, method: int, flags: int, crc: int, csize: int, usize: int, hoff: int,
           ext_attr: int) -> ZipEntry:
    """The entry, completed from its local header (name, method, flags, and where its data starts)."""
    if hoff < 0 or hoff + 30 > src.size:
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
            path, f"zip member {name!r} ends at byte {data_offset + csize}, past the end of the file ({src.size})")
    return ZipEntry(name, method, flags, crc, csize, usize, hoff, data_offset, lname, lmethod, lflags, ext_attr)


def _zip64_extra(path: str, name: str, extra: bytes, usize: int, csize: int, hoff: int,
                 strict: bool) -> tuple[int, int, int]:
    """Sizes and offset from the zip64 extra field, for the fields the header set to 0xFFFFFFFF."""
    p = 0
    while p + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[p : p + 4])
        if strict and p + 4 + size > len(extra):
            raise FormatError(path, f"zip member {name!r} has a corrupt extra field")
        body = extra[p + 4 : p + 4 + size]
        if tag == 1:
            q = 0
            wanted = [v == U32 for v in (usize, csize, hoff)]
            values = [usize, csize, hoff]
            for k in range(3):
                if wanted[k]:
                    if q + 8 > len(body):
                        if strict:
                            raise FormatError(path, f"zip member {name!r} has a short zip64 extra field")
                        break
                    (values[k],) = struct.unpack("<Q", body[q : q + 8])
                    q += 8
            return values[0], values[1], values[2]
        p += 4 + size
    if strict and p != len(extra):
        raise FormatError(path, f"zip member {name!r} has a corrupt extra field")
    return usize, csize, hoff


# -- what torch would make of it ------------------------------------------------------------------


def torch_prefix(zd: ZipDirectory) -> str | None:
    """The folder torch reads from: the first member's top folder (with its slash), or None."""
    if not zd.entries or "/" not in zd.entries[0].name:
        return None
    return zd.entries[0].name.split("/", 1)[0] + "/"


def anomalies(zd: ZipDirectory, prefix: str | None, allow_compressed: bool = False,
              compressed_under: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Every inconsistency a loader could resolve differently from us: ``(member, problem)``.

    Args:
        prefix: the archive's single top folder (``"archive/"``), or ``None`` to skip that check.
        allow_compressed: deflated members are normal (``.npz``); torch never writes them.
        compressed_under: folders whose members may be deflated (a TorchScript archive's ``code/``).
    """
    out: list[tuple[str, str]] = [("(archive)", note) for note in zd.notes]
    for name in zd.duplicates:
        out.append((name, "the name appears twice in the archive"))
    lowered: dict[str, str] = {}
    for e in zd.entries:
        first = lowered.setdefault(fold(e.name), e.name)
        if first != e.name:
            out.append((e.name, f"its name differs only in case from {first!r}; torch cannot tell them apart"))
        if e.name != e.local_name:
            out.append((e.name, f"its local header calls it {e.local_name!r}"))
        if "\0" in e.name or "\0" in e.local_name:
            out.append((e.name, "its name holds a NUL byte, where torch and zipfile cut it short"))
        if e.encrypted or (e.flags | e.local_flags) & 0x20:
            out.append((e.name, "it is encrypted or patch data"))
        if e.method != e.local_method:
            out.append((e.name, "its local and central headers disagree on compression"))
        if e.is_folder and e.size:
            out.append((e.name, "it is a folder entry with data; torch reads uninitialised memory for it"))
        if prefix is not None and not e.name.startswith(prefix):
            out.append((e.name, f"it lies outside the archive's top folder {prefix!r}"))
        if not allow_compressed and e.method != 0 and not e.name.startswith(compressed_under):
            out.append((e.name, f"it is compressed (method {e.method}); torch never writes compressed members"))
        if e.name.startswith("/") or ".." in e.name.split("/"):
            out.append((e.name, "its name escapes the archive"))
        if prefix is not None and fold(e.name) == fold(f"{prefix}data.pkl") and e.name != f"{prefix}data.pkl":
            out.append((e.name, "torch reads it as data.pkl, though its name differs in case"))
    spans = sorted((e.header_offset, e.data_end, e.name) for e in zd.entries)
    for (_a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            out.append((bn, f"it overlaps member {an!r}"))
    for e in zd.entries:
        if e.data_end > zd.cd_offset:
            out.append((e.name, "its data runs into the central directory"))
    return out


__all__ = [
    "INFLATE_BUDGET", "Archive", "InflateBudget", "MemberBytes", "ZipDirectory", "ZipEntry", "anomalies", "contains",
    "fold", "inflate", "is_zip", "iter_member", "member_bytes", "member_head", "read_archive", "read_directory",
    "read_member", "torch_prefix",
]
