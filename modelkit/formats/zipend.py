"""Where a zip reader finds the central directory: torch's miniz, CPython's zipfile, and the rest.

Two readers matter and they disagree on purpose-built files:

* **torch** (``caffe2/serialize/inline_container.cc`` on miniz 3.0.2, ``mz_zip_reader_locate_header_sig``
  and ``mz_zip_reader_read_central_dir``) scans back from the end in 4096-byte chunks for the last
  end-record signature with at least 22 bytes after it, never checks the comment length, then
  follows a zip64 locator found right before that record *whenever* its zip64 record is valid,
  whatever the classic fields say, and reads the directory at the recorded offset, ``count``
  entries long.
* **zipfile** (CPython 3.10-3.13 ``_EndRecData``/``_EndRecData64``/``_RealGetContents``) takes the
  last 22 bytes if they are a record without a comment, else the last signature in the final
  64 KiB (failing if fewer than 22 bytes follow it), reads a zip64 record only right before its
  locator, and reads the directory right before the end records (``concat``), shifting every
  member's offset by the difference; it parses entries until ``cd_size`` bytes are used.

``EndRecord`` is one such reading. A directory that one reader finds and another does not is
how content gets hidden from scanners, so every reading is reported and scanned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import FormatError, TruncatedFileError
from ..model import Source

EOCD_SIG = b"PK\x05\x06"
EOCD64_SIG = b"PK\x06\x06"
LOC64_SIG = b"PK\x06\x07"
EOCD_SIZE = 22
LOC64_SIZE = 20
EOCD64_SIZE = 56
CEN_SIZE = 46
U32 = 0xFFFFFFFF
U16 = 0xFFFF
MINIZ_CHUNK = 4096  # miniz's search buffer; successive chunks overlap by 3 bytes
MINIZ_REACH = 0xFFFF + EOCD_SIZE  # miniz gives up after a failed chunk starting this far from the end
TAIL = MINIZ_REACH + MINIZ_CHUNK  # every byte either reader looks at for an end record


@dataclass(frozen=True)
class EndRecord:
    """One reading of an archive's end records.

    Attributes:
        reader: who reads it so (``torch``, ``zipfile``, ``end record at byte N``...).
        eocd_at: the classic end record's offset.
        count: members, or None when the reader parses ``cd_size`` bytes instead (zipfile).
        cd_size: bytes of central directory.
        cd_offset: where the directory is read (absolute).
        shift: added to every member's local-header offset (zipfile's ``concat``).
        zip64_at: the zip64 end record used, if any.
    """

    reader: str
    eocd_at: int
    count: int | None
    cd_size: int
    cd_offset: int
    shift: int = 0
    zip64_at: int | None = None

    @property
    def key(self) -> tuple[int, int, int, int | None]:
        """What decides the directory read: two readings with one key see the same members."""
        return self.cd_offset, self.cd_size, self.shift, self.count

    def describe(self) -> str:
        n = "?" if self.count is None else str(self.count)
        z = f", through the zip64 record at byte {self.zip64_at}" if self.zip64_at is not None else ""
        s = f", member offsets shifted by {self.shift}" if self.shift else ""
        return f"{n} members in {self.cd_size} bytes at byte {self.cd_offset}{z}{s}"


@dataclass(frozen=True)
class Classic:
    """The fields of a classic end record."""

    at: int
    disk: int
    cd_disk: int
    on_disk: int
    count: int
    cd_size: int
    cd_offset: int
    comment_len: int

    @classmethod
    def read(cls, src: Source, at: int) -> Classic:
        f = struct.unpack("<4sHHHHIIH", src.pread(EOCD_SIZE, at))
        return cls(at, f[1], f[2], f[3], f[4], f[5], f[6], f[7])


def miniz_eocd_offset(src: Source) -> int | None:
    """The end record miniz picks (``mz_zip_reader_locate_header_sig``), or None when it finds none.

    The search goes back chunk by chunk and stops after a failed chunk that starts 65557 bytes or
    more from the end. Its step back is computed in unsigned arithmetic, so a chunk that would
    start before byte 0 turns into a read at a negative offset, which fails: bytes below the last
    whole chunk are never searched.
    """
    size = src.size
    if size < EOCD_SIZE:
        return None
    cur = max(size - MINIZ_CHUNK, 0)
    while True:
        buf = src.pread(min(MINIZ_CHUNK, size - cur), cur)
        end = len(buf)
        while True:
            i = buf.rfind(EOCD_SIG, 0, end)
            if i < 0:
                break
            if size - (cur + i) >= EOCD_SIZE:
                return cur + i
            end = i + 3
        if cur == 0 or size - cur >= MINIZ_REACH:
            return None
        cur -= MINIZ_CHUNK - 3
        if cur < 0:
            return None


def miniz_end(path: str, src: Source) -> EndRecord:
    """The directory torch reads, checked as ``mz_zip_reader_read_central_dir`` checks it.

    Raises:
        FormatError: where miniz refuses the archive (torch.load then fails before unpickling).
    """
    at = miniz_eocd_offset(src)
    if at is None:
        raise TruncatedFileError(path, "the zip archive has no end-of-central-directory record torch can find "
                                       "(truncated, or not a zip)")
    c = Classic.read(src, at)
    count, on_disk, disk, cd_disk, cd_size, cd_offset = c.count, c.on_disk, c.disk, c.cd_disk, c.cd_size, c.cd_offset
    zip64_at: int | None = None
    if at >= LOC64_SIZE + EOCD64_SIZE:
        loc = src.pread(LOC64_SIZE, at - LOC64_SIZE)
        if loc[:4] == LOC64_SIG:
            (rec_at,) = struct.unpack("<Q", loc[8:16])
            if rec_at > src.size - EOCD64_SIZE:
                raise FormatError(path, "the zip64 locator points past the end of the file")
            rec = src.pread(EOCD64_SIZE, rec_at)
            if rec[:4] == EOCD64_SIG:
                zip64_at = rec_at
                rec_size, disk, cd_disk, on_disk, count, cd_size, cd_offset = struct.unpack("<Q4xIIQQQQ", rec[4:56])
                (disks,) = struct.unpack("<I", loc[16:20])
                if rec_size < EOCD64_SIZE - 12:
                    raise FormatError(path, "the zip64 end record is corrupt (its size field is too small)")
                if disks != 1:
                    raise FormatError(path, "multi-part zip archives are not supported")
                if count > U32 or on_disk > U32 or cd_size > U32:
                    raise FormatError(path, "the zip64 end record claims more members or directory bytes than torch reads")
    if count != on_disk or ((disk | cd_disk) != 0 and (disk != 1 or cd_disk != 1)):
        raise FormatError(path, "multi-part zip archives are not supported")
    if cd_size < count * CEN_SIZE:
        raise FormatError(path, f"the zip central directory is corrupt ({count} members cannot fit in {cd_size} bytes)")
    if cd_offset + cd_size > src.size:
        raise TruncatedFileError(path, "the zip central directory lies past the end of the file")
    return EndRecord("torch", at, count, cd_size, cd_offset, 0, zip64_at)


def zipfile_end(src: Source) -> EndRecord | None:
    """The directory CPython's zipfile reads (3.10-3.13), or None where it raises BadZipFile."""
    size = src.size
    if size < EOCD_SIZE:
        return None
    last = src.pread(EOCD_SIZE, size - EOCD_SIZE)
    if last[:4] == EOCD_SIG and last[-2:] == b"\0\0":
        at = size - EOCD_SIZE
    else:
        start = max(size - (1 << 16) - EOCD_SIZE, 0)
        i = src.pread(size - start, start).rfind(EOCD_SIG)
        if i < 0 or start + i + EOCD_SIZE > size:
            return None
        at = start + i
    c = Classic.read(src, at)
    count, cd_size, cd_offset = c.count, c.cd_size, c.cd_offset
    zip64_at: int | None = None
    if at >= LOC64_SIZE:
        loc = src.pread(LOC64_SIZE, at - LOC64_SIZE)
        if loc[:4] == LOC64_SIG:
            diskno, _rel, disks = struct.unpack("<IQI", loc[4:20])
            if diskno != 0 or disks > 1 or at < LOC64_SIZE + EOCD64_SIZE:
                return None  # "span multiple disks", or a seek before byte 0 (OSError -> BadZipFile)
            rec = src.pread(EOCD64_SIZE, at - LOC64_SIZE - EOCD64_SIZE)
            if rec[:4] == EOCD64_SIG:
                zip64_at = at - LOC64_SIZE - EOCD64_SIZE
                count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
    concat = at - cd_size - cd_offset - (LOC64_SIZE + EOCD64_SIZE if zip64_at is not None else 0)
    start_dir = cd_offset + concat
    if start_dir < 0 or start_dir + cd_size > size:
        return None
    return EndRecord("zipfile", at, None, cd_size, start_dir, concat, zip64_at)


def end_signatures(src: Source) -> list[int]:
    """Every end-record signature in the bytes either reader searches (some may lack room for a record)."""
    start = max(src.size - TAIL, 0)
    tail = src.pread(src.size - start, start)
    out: list[int] = []
    i = tail.find(EOCD_SIG)
    while i >= 0:
        out.append(start + i)
        i = tail.find(EOCD_SIG, i + 1)
    return out


def readings_at(src: Source, at: int) -> list[EndRecord]:
    """Every directory the end record at ``at`` can point a reader to: its classic fields, the zip64
    record its locator names and the zip64 record right before the locator (a reader may use either)."""
    if at + EOCD_SIZE > src.size:
        return []
    c = Classic.read(src, at)
    label = f"end record at byte {at}"
    out: list[EndRecord] = []
    if c.cd_offset != U32:  # a sentinel size or count: a lenient reader parses up to the record, or by size
        cd_size = c.cd_size if c.cd_size != U32 else max(at - c.cd_offset, 0)
        out.append(EndRecord(label, at, c.count if c.count != U16 else None, cd_size, c.cd_offset))
    if at >= LOC64_SIZE:
        loc = src.pread(LOC64_SIZE, at - LOC64_SIZE)
        if loc[:4] == LOC64_SIG:
            (rel,) = struct.unpack("<Q", loc[8:16])
            for rec_at in sorted({rel, at - LOC64_SIZE - EOCD64_SIZE}):
                if 0 <= rec_at <= src.size - EOCD64_SIZE:
                    rec = src.pread(EOCD64_SIZE, rec_at)
                    if rec[:4] == EOCD64_SIG:
                        count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
                        out.append(EndRecord(f"zip64 end record at byte {rec_at}", at, count, cd_size, cd_offset,
                                             0, rec_at))
    return [r for r in out if r.cd_offset + r.cd_size <= src.size]


def record_notes(src: Source, torch_end: EndRecord) -> list[str]:
    """What a careful reader would stop at in the end records torch uses."""
    notes: list[str] = []
    c = Classic.read(src, torch_end.eocd_at)
    if c.at + EOCD_SIZE + c.comment_len != src.size:
        notes.append("the end record's comment length does not match the end of the file")
    if torch_end.zip64_at is not None:
        rec = src.pread(EOCD64_SIZE, torch_end.zip64_at)
        count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
        pairs = [("member count", c.count, count, U16), ("directory size", c.cd_size, cd_size, U32),
                 ("directory offset", c.cd_offset, cd_offset, U32)]
        differ = [f"{what} {old} vs {new}" for what, old, new, sentinel in pairs if old not in (sentinel, new)]
        if differ:
            notes.append("the classic end record and the zip64 end record point at different central directories "
                         f"({', '.join(differ)}); torch follows zip64")
        if torch_end.zip64_at != c.at - LOC64_SIZE - EOCD64_SIZE:
            notes.append(f"the zip64 end record torch reads (at byte {torch_end.zip64_at}) is not where other "
                         "readers look for it")
    elif c.at >= LOC64_SIZE and src.pread(4, c.at - LOC64_SIZE) == LOC64_SIG:
        notes.append("a zip64 locator names no valid zip64 end record; readers disagree on what to do")
    return notes
