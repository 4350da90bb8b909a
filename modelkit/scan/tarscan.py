"""Scanning a pre-0.4 tar checkpoint the way ``torch.load`` reads it.

``torch.load`` tries every file that is not a zip archive as a tar archive first
(``torch/serialization.py``: ``_legacy_load`` -> ``legacy_load``). Once ``tarfile`` opens it, torch
reads three members, the last of each name (``TarFile.getmember``), in a fixed order:

* ``storages``, extracted and read unbuffered: a pickled count; per storage a pickle
  ``(key, location, storage_type)``, then what ``UntypedStorage._new_with_file`` reads, an 8-byte
  little-endian element count and count x ``storage_type._dtype``'s element size raw bytes; after
  the last storage, the pickled ``storage_views``;
* ``tensors``, the same way: a pickled count; per tensor a pickle ``(key, storage_id, type)``,
  then an int32 ``ndim``, 4 skipped bytes, ``ndim`` int64 sizes, ``ndim`` int64 strides and an
  int64 offset;
* ``pickle``, through ``tarfile.extractfile`` (a buffered reader): the object pickle, whose
  persistent ids torch resolves to a tensor, or to the first item of a tuple id.

The scanner runs each of those pickles at the offset torch reads it, in torch's reading of its
frames, and stops where torch would raise. Where the next offset depends on something it cannot
know for sure (an element size from a value that is not a known storage class, a count that is
not a plain int, a member that is a link), it stops with a ``TAR_UNFOLLOWED`` finding instead of
guessing. Raw storage bytes are skipped, never read; pickles are read in place (``Window``), and
all of them together under one budget of bytes, so a big member costs nothing and a hostile one
ends in a ``RESOURCE_LIMIT`` finding. Every other member is probed once from its first byte, as a
tool that extracts the archive and unpickles a member would read it.
"""

from __future__ import annotations

import mmap
import struct
import tarfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import RemoteError
from ..formats.pickle_vm import Symbolic, VMCallable
from ..formats.probe import Window, probe
from ..formats.unpickler import DTypeConst, NumpyArray, PlaceholderObject, StorageType, TensorSpec
from ..model import MemorySource, Source
from . import rules as R

if TYPE_CHECKING:
    from .engine import _Ctx

#: Members listed at most (each costs a ``TarInfo``); a checkpoint has three.
MAX_MEMBERS = 10_000
#: The most one header read may take (PAX records and GNU long names are read whole).
MAX_HEADER_READ = 1 << 20
#: Bytes of pickles run per archive, all members together (a pickle runs at most one opcode per
#: byte, so this bounds the time to about two seconds). A checkpoint of the tar era with a
#: thousand tensors has about 200 KB of them.
PICKLE_BUDGET = 2 << 20
#: Pickles run per archive: one per storage and per tensor, and a few more (about a second).
MAX_PICKLES = 20_000

_ROLES = ("storages", "tensors", "pickle")


class _HeaderTooBig(Exception):
    pass


class _TarFile:
    """The file ``tarfile`` lists: reads through ``Source.pread``, each at most ``MAX_HEADER_READ``."""

    def __init__(self, src: Source):
        self.src = src
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.src.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        if n > MAX_HEADER_READ:
            raise _HeaderTooBig(n)
        out = self.src.pread(n, self.pos)
        self.pos += n
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.src.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos


def list_members(ctx: _Ctx, src: Source, label: str) -> list[tarfile.TarInfo] | None:
    """The members ``tarfile`` lists, or None when it does not open the file (torch.load then
    unpickles it from byte 0) or an error stops the listing (torch falls back the same way)."""
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=_TarFile(src), mode="r:") as tf:  # type: ignore[call-overload]
            for m in tf:
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    ctx.add(R.RESOURCE_LIMIT, f"a tar archive of more than {MAX_MEMBERS} members exceeds a resource "
                                              "bound; it was not scanned as a torch checkpoint", label)
                    return None
    except _HeaderTooBig as exc:
        ctx.add(R.RESOURCE_LIMIT, f"a tar header record of {exc.args[0]} bytes exceeds a resource bound "
                                  f"({MAX_HEADER_READ}); the archive was not scanned as a torch checkpoint", label)
        return None
    except RemoteError:
        raise  # the bytes could not be read: not evidence that this is no tar archive
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError):
        return None
    return members


def scan_tar(ctx: _Ctx, src: Source, depth: int, label: Callable[[str], str]) -> None:
    """Scan ``src`` as torch's tar loader reads it; nothing when it is not a tar archive."""
    members = list_members(ctx, src, label("tar"))
    if not members:
        return
    regular = [m for m in members if m.isfile()]
    ctx.add(R.WRAPPED, f"a tar archive of {len(regular)} files (torch.load reads old checkpoints so)", src.path)
    if isinstance(src, MemorySource):
        _TarReading(ctx, src.data, depth, label).run(members)
        return
    src.materialize()
    with mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ) as data:
        _TarReading(ctx, data, depth, label).run(members)


# -- what torch would do with the values the pickles yield ----------------------------------------

_UNKNOWN = object()  # a value whose effect on torch's reading the scanner cannot know
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _plain_key(value: Any, depth: int = 0) -> bool:
    """A hashable value whose equality the scanner knows (a key of torch's table)."""
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, (tuple, frozenset)) and depth < 8 and all(_plain_key(v, depth + 1) for v in value)


def _unhashable(value: Any) -> bool:
    return isinstance(value, (list, dict, set, bytearray))


_CONTAINERS = (bytearray, list, tuple, dict, set, frozenset)


def _count(value: Any) -> Any:
    """``range(value)``: the loop count, None when torch raises, or ``_UNKNOWN``.

    ``range`` takes an int or an object whose *type* has ``__index__``: constants, containers,
    dtypes, functions, classes and placeholder objects (whose classes have none) fail; a tensor
    or an array of one integer would pass.
    """
    if isinstance(value, int):  # bool and big ints included
        return max(0, int(value))
    if isinstance(value, (*_PLAIN, *_CONTAINERS, DTypeConst, VMCallable, PlaceholderObject)):
        return None
    return _UNKNOWN


def _three(value: Any) -> Any:
    """``a, b, c = value``: the three items, None when torch raises, or ``_UNKNOWN``."""
    if isinstance(value, (tuple, list, dict, str, bytes, bytearray)):
        items = list(value)  # a dict unpacks into its keys, a str into its characters
    elif isinstance(value, (set, frozenset)) and all(isinstance(v, _PLAIN) for v in value):
        items = list(value)  # in hash order; each item is plain, so torch fails on any of them alike
    elif isinstance(value, (*_PLAIN, DTypeConst, VMCallable, TensorSpec, NumpyArray)):
        return None  # not iterable, or its items are tensors or numbers, which have no ``_dtype``
    else:
        return _UNKNOWN
    return tuple(items) if len(items) == 3 else None


def _itemsize(storage_type: Any) -> Any:
    """``_element_size(storage_type._dtype)``: bytes per element, None when torch raises, or ``_UNKNOWN``.

    Only the legacy storage classes have a ``_dtype`` that is a dtype (UntypedStorage has none);
    an object whose attributes the file sets (a placeholder object) could have one.
    """
    if isinstance(storage_type, StorageType):
        return storage_type.dtype.itemsize if storage_type.dtype is not None else None
    if isinstance(storage_type, (*_PLAIN, *_CONTAINERS, DTypeConst, VMCallable, TensorSpec, NumpyArray)):
        return None
    return _UNKNOWN


def _persistent_load(pid: Any) -> Any:
    """torch's ``persistent_load`` for the tar 'pickle' member: a tuple id gives its first item
    (the class of a pickled module), any other id a tensor or storage from the earlier members."""
    if isinstance(pid, tuple):
        if not pid:
            raise ValueError("an empty persistent id (torch's tar loader fails on it)")
        return pid[0]
    return Symbolic("a tensor of the tar checkpoint")


class _Stop(Exception):
    """torch's reading stops here (it raises, or the scanner cannot follow it)."""


class _TarReading:
    def __init__(self, ctx: _Ctx, data: Any, depth: int, label: Callable[[str], str]):
        self.ctx = ctx
        self.data = data
        self.depth = depth
        self.label = label
        self.budget = PICKLE_BUDGET
        self.pickles = 0
        self.over = False
        #: The keys of torch's ``deserialized_objects``; None once one is a value the scanner
        #: cannot compare (then a lookup is assumed to succeed).
        self.keys: set[Any] | None = set()

    # -- the reading -------------------------------------------------------------------------
    def run(self, members: list[tarfile.TarInfo]) -> None:
        last = {m.name: m for m in members}  # TarFile.getmember: the last member of a name
        read: set[int] = set()
        try:
            for role, step in zip(_ROLES, (self.storages, self.tensors, self.pickle)):
                m = last.get(role)
                if m is None:
                    break  # KeyError: torch.load fails here
                self.check_member(m)
                if role != "pickle" and m.offset_data + m.size > len(self.data):
                    break  # extract() fails (a TarError): torch.load unpickles the file from byte 0 instead
                read.add(id(m))
                step(m)
        except _Stop:
            pass
        for m in members:
            if m.isfile() and id(m) not in read:
                self.probe_member(m)

    def check_member(self, m: tarfile.TarInfo) -> None:
        if m.isreg() and not m.issparse():
            return
        what = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else "a sparse file" if m.issparse()
                else "not a regular file")
        self.unfollowed(m, f"torch reads member {m.name!r}, which is {what}: its bytes come from elsewhere "
                           "(or nowhere) when it is extracted")

    def storages(self, m: tarfile.TarInfo) -> None:
        pos, end = self.extent(m)
        label = self.label(f"tar:{m.name}")
        pos, value = self.pickle_at(pos, end, label)
        n = self.loop_count(m, value, "storages")
        for _ in range(n):
            pos, value = self.pickle_at(pos, end, label)
            args = self.known(m, _three(value), "the arguments of a storage")
            key, _location, storage_type = args
            size = self.known(m, _itemsize(storage_type), "the storage type of a storage")
            if pos + 8 > end:
                raise _Stop  # _new_with_file: unexpected EOF
            (numel,) = struct.unpack("<q", self.data[pos : pos + 8])
            if numel < 0 or pos + 8 + numel * size > end:
                raise _Stop  # a negative size, or a storage past the end of the member
            pos += 8 + numel * size
            # restore_location(obj, location) fails on a location no backend knows, but not when the
            # caller passes map_location: read on either way.
            self.add_key(key)
        _, views = self.pickle_at(pos, end, label)
        self.storage_views(views)

    def tensors(self, m: tarfile.TarInfo) -> None:
        pos, end = self.extent(m)
        label = self.label(f"tar:{m.name}")
        pos, value = self.pickle_at(pos, end, label)
        n = self.loop_count(m, value, "tensors")
        for _ in range(n):
            pos, value = self.pickle_at(pos, end, label)
            key, storage_id, _type = self.known(m, _three(value), "the arguments of a tensor")
            self.lookup(storage_id)
            if pos + 4 > end:
                raise _Stop
            (ndim,) = struct.unpack("<i", self.data[pos : pos + 4])
            pos = min(pos + 8, end)  # ndim, then 4 bytes skipped (a short read there is no error)
            if ndim < 0 or pos + 16 * ndim + 8 > end:
                raise _Stop  # struct.unpack of sizes, strides or the offset fails
            pos += 16 * ndim + 8
            self.add_key(key)

    def pickle(self, m: tarfile.TarInfo) -> None:
        pos, end = self.extent(m)
        self.pickle_at(pos, end, self.label(f"tar:{m.name}"), _persistent_load, buffered=True)

    # -- torch's bookkeeping -----------------------------------------------------------------
    def loop_count(self, m: tarfile.TarInfo, value: Any, what: str) -> int:
        n: int = self.known(m, _count(value), f"the count of {what}")
        return n

    def known(self, m: tarfile.TarInfo, value: Any, what: str) -> Any:
        if value is None:
            raise _Stop
        if value is _UNKNOWN:
            self.unfollowed(m, f"{what} is a value whose effect on torch's reading the scanner cannot know, so where "
                               "torch reads the next pickle is unknown")
        return value

    def add_key(self, key: Any) -> None:
        if _unhashable(key):
            raise _Stop  # deserialized_objects[key] = ...: TypeError
        if self.keys is not None:
            if _plain_key(key):
                self.keys.add(key)
            else:
                self.keys = None

    def lookup(self, key: Any) -> None:
        if _unhashable(key):
            raise _Stop
        if self.keys is not None and _plain_key(key) and key not in self.keys:
            raise _Stop  # KeyError

    def storage_views(self, views: Any) -> None:
        """``for target, root, offset, numel in storage_views``: records the views' keys."""
        if isinstance(views, (list, tuple)):
            for view in views:
                if isinstance(view, (list, tuple)) and len(view) == 4:
                    self.lookup(view[1])
                    self.add_key(view[0])
                elif isinstance(view, (type(None), bool, int, float, complex, DTypeConst, VMCallable)):
                    raise _Stop  # cannot be unpacked
                else:
                    self.keys = None
        elif isinstance(views, (type(None), bool, int, float, complex, DTypeConst, VMCallable)):
            raise _Stop  # not iterable
        else:
            self.keys = None

    # -- reading pickles ---------------------------------------------------------------------
    def extent(self, m: tarfile.TarInfo) -> tuple[int, int]:
        # A truncated 'pickle' member is read through extractfile() until its read fails.
        return m.offset_data, min(m.offset_data + m.size, len(self.data))

    def pickle_at(self, pos: int, end: int, label: str, pload: Any = None, buffered: bool = False) -> tuple[int, Any]:
        """Run the pickle torch reads at ``pos``: (where torch reads next, its value).

        ``storages`` and ``tensors`` are read from an unbuffered file, which drops the rest of a
        frame the way ``io.BytesIO`` does; ``pickle`` from a buffered reader, which does not.
        """
        ctx = self.ctx
        if self.pickles >= MAX_PICKLES:
            self.limit(f"more than {MAX_PICKLES} pickles")
        if self.budget <= 0:
            self.limit(f"more than {PICKLE_BUDGET} bytes of pickles")
        self.pickles += 1
        stop = min(end, pos + self.budget)
        win = Window(self.data, pos, stop)
        before = len(ctx.findings)
        got, value = ctx.run_pickle_value(win, label, pos, pload, self.depth)
        if got is None:
            # Cut short by the budget, not by the file: that is the finding, not a truncation.
            cut = [f for f in ctx.findings[before:] if f.rule == R.PICKLE_ERROR.id and f.member == label
                   and "truncated" in f.message] if stop < end else []
            if cut:
                for f in cut:
                    ctx.findings.remove(f)
                self.limit(f"more than {PICKLE_BUDGET} bytes of pickles")
            raise _Stop
        if not buffered and any(f.rule == R.FRAME_ANOMALY.id for f in ctx.findings[before:]):
            p = probe(win, pos, drop_frames=True)
            if p.next_pos is None:
                raise _Stop
            got, value = p.next_pos, p.value
        self.budget -= got
        return pos + got, value

    def probe_member(self, m: tarfile.TarInfo) -> None:
        """Another member: probed once from its first byte (only what could run is reported)."""
        start, end = m.offset_data, min(m.offset_data + m.size, len(self.data))
        if end <= start or self.over:
            return
        stop = min(end, start + self.budget)
        win = Window(self.data, start, stop)
        p = probe(win, start, keep_blobs=True)
        used = p.end if p.end is not None else (p.error.offset - start + 1 if p.error is not None else len(win))
        self.budget -= max(1, used)
        if p.dangerous or p.blobs:
            self.ctx.pickles += 1
            self.ctx.note_probe(p, self.label(f"tar:{m.name}"), win, start, self.depth)
        if stop < end and p.error is not None and p.error.kind == "truncated":
            try:
                self.limit(f"more than {PICKLE_BUDGET} bytes of pickles")
            except _Stop:
                pass

    # -- findings ----------------------------------------------------------------------------
    def limit(self, what: str) -> None:
        if not self.over:
            self.over = True
            self.ctx.add(R.RESOURCE_LIMIT, f"the tar archive has {what}, which exceeds a resource bound; the rest was "
                                           "not scanned", self.label("tar"))
        raise _Stop

    def unfollowed(self, m: tarfile.TarInfo, message: str) -> None:
        self.ctx.add(R.TAR_UNFOLLOWED, message, self.label(f"tar:{m.name}"), m.offset_data)
        raise _Stop
