"""PyTorch zip archives (``torch.save`` since 1.6): read in place, storages by byte offset.

Layout: one top folder (``archive/`` by default, but any name) holding ``data.pkl`` (the
structure, a pickle whose persistent ids name storages), ``data/<key>`` (raw storage bytes,
stored uncompressed and 64-byte aligned by torch), ``byteorder`` and ``version``. We parse the
central directory ourselves, unpickle ``data.pkl`` under the allow-list, and locate each storage
by its member's data offset. Nothing is extracted and no storage is read while unpickling.
"""

from __future__ import annotations

from typing import Any

from .. import dtypes
from ..errors import FormatError, UnsafeFileError
from ..model import ModelFile, Source
from .flatten import assemble, flatten
from .pickle_vm import Limits, PickleError
from .unpickler import RefusedHook, StorageRef, StorageType, make_policy, refuse, run_pickle
from .zipdir import ZipDirectory, ZipEntry, anomalies, read_directory, read_member


def find_prefix(path: str, zd: ZipDirectory) -> str:
    """The archive's top folder (with its trailing slash), found from its ``data.pkl``."""
    cands = [e.name[: -len("data.pkl")] for e in zd.entries if e.name.endswith("/data.pkl") and e.name.count("/") == 1]
    if not cands and "data.pkl" in zd.by_name:
        cands = [""]
    if not cands:
        raise FormatError(path, "this zip archive has no data.pkl, so it is not a PyTorch file")
    if len(set(cands)) > 1:
        raise FormatError(path, f"this zip archive has {len(set(cands))} data.pkl files; which one torch reads is ambiguous")
    return cands[0]


def storage_loader(path: str, storages: dict[str, StorageRef]) -> Any:
    """The persistent_load for zip archives: ``('storage', type, key, location, numel)``."""

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {str(pid)[:80]}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, StorageType):
            raise ValueError("a persistent id names a storage type that is not a torch storage")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise ValueError("malformed storage persistent id")
        dt = stype.dtype or dtypes.UINT8
        ref = storages.get(key)
        if ref is None:
            ref = storages[key] = StorageRef(key=key, dtype=dt, numel=numel, location=location)
        elif ref.dtype.itemsize * ref.numel != dt.itemsize * numel:
            raise ValueError(f"storage {key} is used with two different sizes")
        return ref

    return persistent_load


def run_data_pkl(
    path: str, src: Source, zd: ZipDirectory, prefix: str, hook: RefusedHook, limits: Limits | None = None
) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data.pkl`` under the allow-list; returns (structure, storages by key)."""
    entry = zd.by_name[prefix + "data.pkl"]
    data = read_member(path, src, entry)
    storages: dict[str, StorageRef] = {}
    policy = make_policy(hook, storage_loader(path, storages))
    value, _ = run_pickle(data, policy, base_offset=entry.data_offset if entry.method == 0 else 0, limits=limits)
    return value, storages


def read_torch_zip(path: str, src: Source) -> ModelFile:
    """Open a PyTorch zip archive (the caller owns ``src``)."""
    zd = read_directory(path, src)
    prefix = find_prefix(path, zd)
    bad = anomalies(zd, prefix)
    if bad:
        member, problem = bad[0]
        raise UnsafeFileError(path, f"refused to load: zip member {member!r} is inconsistent ({problem})")
    byteorder = "little"
    bo = zd.by_name.get(prefix + "byteorder")
    if bo is not None:
        text = read_member(path, src, bo, 64).decode("ascii", "replace").strip()
        if text not in ("little", "big"):
            raise FormatError(path, f"the archive's byteorder record says {text!r}")
        byteorder = text
    try:
        root, storages = run_data_pkl(path, src, zd, prefix, refuse(path))
    except PickleError as exc:
        raise FormatError(path, f"data.pkl is corrupt at byte {exc.offset}: {exc}") from None
    for ref in storages.values():
        ref.byteorder = byteorder

    def locate(ref: StorageRef) -> tuple[int, int, Any]:
        entry = zd.by_name.get(f"{prefix}data/{ref.key}")
        if entry is None:
            raise FormatError(path, f"storage {ref.key!r} is missing from the archive (no {prefix}data/{ref.key})")
        need = ref.numel * ref.dtype.itemsize
        if entry.size < need:
            raise FormatError(path, f"storage {ref.key!r} should hold {need} bytes but its member has {entry.size}")
        return _member_location(path, entry)

    flat = flatten(path, root)
    return assemble(path, "torch-zip", src, flat, locate, info={"archive_prefix": prefix.rstrip("/"), "byteorder": byteorder})


def _member_location(path: str, entry: ZipEntry) -> tuple[int, int, Any]:
    if entry.encrypted:
        raise FormatError(path, f"zip member {entry.name!r} is encrypted")
    if entry.method == 0:
        return entry.data_offset, entry.size, None
    if entry.method == 8:
        return entry.data_offset, entry.size, (entry.data_offset, entry.compressed_size)
    raise FormatError(path, f"zip member {entry.name!r} uses compression method {entry.method}")
