"""The legacy ``torch.save`` stream (before 1.6, or ``_use_new_zipfile_serialization=False``).

Layout: five pickles, then raw storages::

    pickle(MAGIC) pickle(PROTOCOL=1001) pickle(sys_info) pickle(object) pickle([storage keys])
    for each key: int64 element count, then count * itemsize bytes

The object pickle names storages by persistent ids
``('storage', type, root_key, location, numel, view_metadata)``. All five pickles run under the
allow-list; storages are located by walking the counts, never by reading their bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..errors import TruncatedFileError
from ..model import ModelFile, Source
from .flatten import assemble, flatten
from .pickle_vm import FileBytes, Limits, PickleError, PickleVM, Policy, Symbolic
from .unpickler import Placeholder, RefusedHook, StorageRef, StorageType, make_policy, reader_error, refuse

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001


@dataclass
class LegacyStream:
    """What parsing a legacy stream found (positions are relative to the stream start)."""

    root: Any
    sys_info: Any
    storages: dict[str, StorageRef]
    pickle_spans: list[tuple[int, int]] = field(default_factory=list)
    end: int = 0


def magic_kind(value: Any) -> str:
    """How torch's ``if magic_number != MAGIC_NUMBER: raise`` treats a first pickle's value.

    ``"exact"``: the int itself. ``"no"``: a value that is never equal (other ints, text,
    containers). ``"maybe"``: a value whose ``!=`` could come out False: a float near the magic
    (a numpy scalar compares after rounding the int, so ``numpy.float64(1.19e23)`` and even a
    float16 ``inf`` pass), or an object (tensor, array) that compares element-wise. The scanner
    reads a "maybe" both ways; the loader refuses it.
    """
    if type(value) is int:
        return "exact" if value == MAGIC else "no"
    if value is None or isinstance(value, (bool, int, str, bytes, bytearray, list, tuple, dict, set, frozenset)):
        return "no"
    if isinstance(value, (float, complex)):
        v = complex(value)
        if v.imag == 0 and (v.real in (float("inf"), float("-inf")) or abs(v.real - MAGIC) <= MAGIC * 1e-2):
            return "maybe"
        return "no"
    from .unpickler import NumpyArray, TensorSpec

    if isinstance(value, (TensorSpec, NumpyArray, Symbolic)):
        return "maybe"  # element-wise comparison; a Symbolic is already a finding
    return "no"  # placeholders, storages, dtypes, functions and classes compare by identity


def is_legacy(head: bytes) -> bool:
    """A legacy stream starts with a pickled MAGIC number (protocol 2 by default)."""
    return head.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.")


def _legacy_pid(storages: dict[str, StorageRef], views: dict[str, tuple[str, int, int]]) -> Any:
    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], Placeholder):
            # torch's legacy saver names an nn.Module class with its source (to warn when it
            # changed); its loader returns the class. Only an allowed placeholder class passes.
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                raise ValueError("the file pickles whole nn.Module classes with their source code")
            raise ValueError(f"unexpected persistent id {str(pid)[:80]}")
        _, stype, key, location, numel, view = pid
        if not isinstance(stype, StorageType):
            raise ValueError("a persistent id names a storage type that is not a torch storage")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ValueError("malformed storage persistent id")
        dt = stype.dtype or dtypes.UINT8
        root = storages.get(key)
        if root is None:
            root = storages[key] = StorageRef(key=key, dtype=dt, numel=numel, location=str(location))
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and type(view[1]) is int and type(view[2]) is int and view[1] >= 0 and view[2] >= 0):
            raise ValueError("malformed storage view in a persistent id")
        view_key, offset, size = view
        ref = storages.get(view_key)
        if ref is None:
            ref = storages[view_key] = StorageRef(key=view_key, dtype=dt, numel=size, location=str(location),
                                                  view_of=(key, offset))
        return ref

    return persistent_load


def parse_stream(
    data: Any, hook: RefusedHook, *, base_offset: int = 0, limits: Limits | None = None,
    outer: Policy | None = None, scan_globals: list[tuple[str, str, int]] | None = None,
    on_unsafe: Any = None, drop_frames: bool = False, lenient_magic: bool = False,
    nested_loads: list[bytes] | None = None,
) -> LegacyStream:
    """Run the five pickles of a legacy stream and locate every storage.

    Args:
        data: the stream (bytes or mmap), starting at the magic pickle.
        hook: what a refused global becomes (loader: raise; scanner: record).
        base_offset: where ``data[0]`` sits in the file; storage offsets come out absolute.
        outer: the policy of an enclosing pickle (a nested ``_load_from_bytes`` stream): its
            globals and unsafe-call hooks apply here too.
        on_unsafe: the policy's ``on_unsafe`` hook (scanner: record; loader: ``None``, raise).
        drop_frames: read FRAMEs as a reader without ``peek`` does (see ``PickleVM``).
        lenient_magic: accept a first pickle that torch might take for the magic number (the
            scanner, which must follow torch); the loader accepts only the int itself.
        nested_loads: where the byte values handed to ``_load_from_bytes`` are collected.

    Raises:
        PickleError: a malformed stream (with ``kind`` "truncated" when it ends early).
    """
    storages: dict[str, StorageRef] = {}
    views: dict[str, tuple[str, int, int]] = {}
    plain_policy = make_policy(hook, None, on_unsafe)
    if outer is not None:
        plain_policy = Policy(find_global=outer.find_global, persistent_load=None, extension=outer.extension,
                              on_unsafe=outer.on_unsafe)
    pos = 0
    spans: list[tuple[int, int]] = []

    def one(policy: Policy) -> Any:
        nonlocal pos
        window = data[pos:] if isinstance(data, bytes) else _Slice(data, pos)
        vm = PickleVM(window, policy, base_offset=base_offset + pos, limits=limits, drop_frames=drop_frames)
        try:
            value = vm.run()
        finally:
            if scan_globals is not None:
                scan_globals.extend(vm.globals_seen)
            if nested_loads is not None:
                nested_loads.extend(vm.nested_loads)
        spans.append((pos, pos + vm.end_pos))
        pos += vm.end_pos
        return value

    magic = one(plain_policy)
    kind = magic_kind(magic)
    if kind == "no" or (kind == "maybe" and not lenient_magic):
        raise PickleError("not a torch legacy stream (wrong magic number)", base_offset + pos)
    protocol = one(plain_policy)
    if protocol != PROTOCOL:
        raise PickleError(f"unsupported torch legacy protocol {protocol!r}", base_offset + pos)
    sys_info = one(plain_policy)
    obj_policy = make_policy(hook, _legacy_pid(storages, views), on_unsafe)
    if outer is not None:
        obj_policy = Policy(find_global=outer.find_global, persistent_load=obj_policy.persistent_load,
                            extension=outer.extension, on_unsafe=outer.on_unsafe)
    root = one(obj_policy)
    keys = one(plain_policy)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise PickleError("the storage key list is malformed", base_offset + pos)
    big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    for key in keys:
        ref = storages.get(key)
        if ref is None:
            raise PickleError(f"storage {key!r} is listed but never used, so its element size is unknown", base_offset + pos)
        if pos + 8 > len(data):
            raise PickleError(f"the file ends before storage {key!r}", base_offset + pos, "truncated")
        (count,) = struct.unpack(">q" if big else "<q", bytes(data[pos : pos + 8]))
        nbytes = count * ref.dtype.itemsize
        if count < 0 or pos + 8 + nbytes > len(data):
            raise PickleError(f"storage {key!r} claims {count} elements, past the end of the file", base_offset + pos, "truncated")
        ref.file_offset = base_offset + pos + 8
        ref.nbytes = nbytes
        ref.byteorder = "big" if big else "little"
        pos += 8 + nbytes
    for ref in storages.values():
        if ref.view_of is not None:
            root_ref = storages[ref.view_of[0]]
            if root_ref.file_offset is None or root_ref.nbytes is None:
                raise PickleError(f"storage view {ref.key!r} points at a storage that is not in the file", base_offset + pos)
            start = ref.view_of[1] * root_ref.dtype.itemsize
            ref.file_offset = root_ref.file_offset + start
            ref.nbytes = max(0, root_ref.nbytes - start)
            ref.byteorder = root_ref.byteorder
        elif ref.file_offset is None:
            raise PickleError(f"storage {ref.key!r} is used but not in the storage list", base_offset + pos)
    return LegacyStream(root=root, sys_info=sys_info, storages=storages, pickle_spans=spans, end=pos)


class _Slice:
    """A zero-copy window on an mmap from ``start`` (index, slice, find, len)."""

    def __init__(self, data: Any, start: int):
        self.data = data
        self.start = start

    def __len__(self) -> int:
        return len(self.data) - self.start

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            a = self.start + (i.start or 0)
            b = self.start + (len(self) if i.stop is None else i.stop)
            return self.data[a:b]
        return self.data[self.start + i]

    def find(self, sub: bytes, start: int, end: int) -> int:
        r = self.data.find(sub, self.start + start, self.start + end)
        return r - self.start if r >= 0 else -1


def storage_from_nested_stream(vm: PickleVM, raw: bytes) -> StorageRef:
    """``torch.storage._load_from_bytes``: a legacy stream of one storage, inside a pickle.

    With protocol 3+ the bytes sit verbatim in the file (``FileBytes``) and the storage is read
    by offset; protocol 2 spells them as latin1 text, so the storage keeps its own copy.
    """
    in_file = isinstance(raw, FileBytes)
    stream = parse_stream(bytes(raw), _refuse_unreachable, base_offset=raw.offset if isinstance(raw, FileBytes) else 0,
                          limits=vm.limits, outer=vm.policy, scan_globals=vm.globals_seen,
                          nested_loads=vm.nested_loads)
    root = stream.root
    if not isinstance(root, StorageRef):
        raise vm.error("torch.storage._load_from_bytes does not hold a storage")
    if not in_file:
        assert root.file_offset is not None and root.nbytes is not None
        root.inline = bytes(raw[root.file_offset : root.file_offset + root.nbytes])
        root.file_offset = 0
    return root


def _refuse_unreachable(module: str, name: str, offset: int) -> Any:  # pragma: no cover - replaced above
    raise PickleError(f"{module}.{name} is not allowed", offset)


def read_torch_legacy(path: str, src: Source) -> ModelFile:
    """Open a legacy torch stream (the caller owns ``src``)."""
    if src.size == 0:
        raise TruncatedFileError(path, "the file is empty")
    with mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ) as mm:
        try:
            stream = parse_stream(mm, refuse(path))
        except PickleError as exc:
            raise reader_error(path, exc, "the legacy torch stream") from None
        from .pickle_file import refuse_trailing

        refuse_trailing(path, mm, stream.end)
    flat = flatten(path, stream.root)

    def locate(ref: StorageRef) -> tuple[int, int, Any]:
        assert ref.file_offset is not None and ref.nbytes is not None
        return ref.file_offset, ref.nbytes, None

    return assemble(path, "torch-legacy", src, flat, locate,
                    info={"sys_info": stream.sys_info if isinstance(stream.sys_info, dict) else None})
