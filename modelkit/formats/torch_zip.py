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
from .probe import HEAD_STEPS, Probe, probe
from .unpickler import RefusedHook, StorageRef, StorageType, make_policy, reader_error, refuse, run_pickle
from .zipdir import ZipDirectory, ZipEntry, anomalies, read_directory, read_member, torch_prefix


def find_prefix(path: str, zd: ZipDirectory) -> str:
    """The archive's top folder (with its slash), chosen as torch chooses it: the first member's."""
    prefix = torch_prefix(zd)
    if prefix is None:
        raise FormatError(path, "this zip archive's first member is not in a folder, so it is not a PyTorch file")
    if zd.lookup(prefix + "data.pkl") is None:
        raise FormatError(path, f"this zip archive has no {prefix}data.pkl, so it is not a PyTorch file")
    return prefix


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
    entry = zd.lookup(prefix + "data.pkl")
    assert entry is not None
    data = read_member(path, src, entry)
    storages: dict[str, StorageRef] = {}
    policy = make_policy(hook, storage_loader(path, storages))
    value, _ = run_pickle(data, policy, base_offset=entry.data_offset if entry.method == 0 else 0, limits=limits)
    return value, storages


def read_torch_zip(path: str, src: Source, zd: ZipDirectory | None = None, allow_hidden: bool = False) -> ModelFile:
    """Open a PyTorch zip archive (the caller owns ``src``; ``zd`` if already read).

    Members other than data.pkl are probed too, and a hostile pickle in any of them refuses the
    archive, unless ``allow_hidden`` (they are never run either way).
    """
    zd = zd or read_directory(path, src)
    prefix = find_prefix(path, zd)
    bad = anomalies(zd, prefix)
    if bad:
        member, problem = bad[0]
        raise UnsafeFileError(path, f"refused to load: zip member {member!r} is inconsistent ({problem})")
    byteorder = "little"
    bo = zd.lookup(prefix + "byteorder")
    if bo is not None:
        text = read_member(path, src, bo, 64).decode("ascii", "replace").strip()
        if text not in ("little", "big"):
            raise FormatError(path, f"the archive's byteorder record says {text!r}")
        byteorder = text
    try:
        root, storages = run_data_pkl(path, src, zd, prefix, refuse(path))
    except PickleError as exc:
        raise reader_error(path, exc, "data.pkl") from None
    for ref in storages.values():
        ref.byteorder = byteorder
    if not allow_hidden:
        refuse_hidden_pickles(path, src, zd, zd.lookup(prefix + "data.pkl"))

    def locate(ref: StorageRef) -> tuple[int, int, Any]:
        entry = zd.lookup(f"{prefix}data/{ref.key}")
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
        return entry.data_offset, entry.size, (entry.data_offset, entry.compressed_size, entry.size, entry.crc)
    raise FormatError(path, f"zip member {entry.name!r} uses compression method {entry.method}")


def probe_members(path: str, src: Source, zd: ZipDirectory, skip: ZipEntry | None) -> list[tuple[ZipEntry, Probe]]:
    """Probe every member but ``skip`` (data.pkl) as a pickle: ``.pkl`` members whole, others
    from their first bytes, read further only while the probe keeps running.

    Returns:
        (member, probe) for each member the probe could run on.
    """
    out: list[tuple[ZipEntry, Probe]] = []
    for e in zd.entries:
        if e is skip or e.encrypted or e.method not in (0, 8):
            continue
        if e.method == 0 and not e.name.endswith(".pkl"):
            done = False
            for step in HEAD_STEPS:
                head = src.pread(min(step, e.compressed_size), e.data_offset)
                p = probe(head, e.data_offset)
                # Read on only while the pickle could still end inside this member.
                needed = p.error.needed if p.error is not None else None
                if needed is not None and needed > e.data_end:
                    out.append((e, p))
                    done = True
                    break
                if not (p.error is not None and p.error.kind == "truncated" and e.compressed_size > len(head)):
                    out.append((e, p))
                    done = True
                    break
            if done:
                continue
        try:
            data = read_member(path, src, e)
        except FormatError:
            continue
        out.append((e, probe(data, e.data_offset if e.method == 0 else 0, keep_blobs=True)))
    return out


def refuse_hidden_pickles(path: str, src: Source, zd: ZipDirectory, skip: ZipEntry | None) -> None:
    """The reader's side of ``probe_members``: refuse an archive that hides a payload anywhere."""
    for e, p in probe_members(path, src, zd, skip):
        if p.dangerous:
            module, name, off = p.dangerous[0]
            raise UnsafeFileError(path, f"refused to load: member {e.name!r} holds a pickle that names {module}.{name} "
                                        f"(at byte {off})", global_name=f"{module}.{name}")
