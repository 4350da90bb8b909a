"""PyTorch zip archives (``torch.save`` since 1.6): read in place, storages by byte offset.

Layout: one top folder (``archive/`` by default, but any name) holding ``data.pkl`` (the
structure, a pickle whose persistent ids name storages), ``data/<key>`` (raw storage bytes,
stored uncompressed and 64-byte aligned by torch), ``byteorder`` and ``version``. We parse the
central directory ourselves, unpickle ``data.pkl`` under the allow-list, and locate each storage
by its member's data offset. Nothing is extracted and no storage is read while unpickling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import dtypes
from ..errors import FormatError, ResourceLimitError, UnsafeFileError, UnsupportedFormatError
from ..model import ModelFile, Source
from .flatten import assemble, flatten
from .pickle_vm import Limits, PickleError
from .probe import HEAD_STEPS, Probe, probe
from .unpickler import RefusedHook, StorageRef, StorageType, make_policy, reader_error, refuse, run_pickle
from .zipdir import (
    InflateBudget,
    MemberBytes,
    ZipDirectory,
    ZipEntry,
    anomalies,
    contains,
    fold,
    member_bytes,
    member_head,
    read_directory,
    read_member,
    torch_prefix,
)


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
    path: str, src: Source, zd: ZipDirectory, prefix: str, hook: RefusedHook, limits: Limits | None = None,
    budget: InflateBudget | None = None,
) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data.pkl`` under the allow-list; returns (structure, storages by key)."""
    entry = zd.lookup(prefix + "data.pkl")
    assert entry is not None
    data = read_member(path, src, entry, budget=budget)
    storages: dict[str, StorageRef] = {}
    policy = make_policy(hook, storage_loader(path, storages))
    value, _ = run_pickle(data, policy, base_offset=entry.data_offset if entry.method == 0 else 0, limits=limits)
    return value, storages


def read_torch_zip(path: str, src: Source, zd: ZipDirectory | None = None, allow_hidden: bool = False) -> ModelFile:
    """Open a PyTorch zip archive (the caller owns ``src``; ``zd`` if already read).

    Members other than data.pkl are probed too, and a hostile pickle in any of them refuses the
    archive, unless ``allow_hidden`` (they are never run either way).

    Raises:
        UnsafeFileError: readers disagree on the archive, a member hides a payload, or it is a
            TorchScript program whose code runs on load.
        UnsupportedFormatError: a TorchScript program (torch.jit.save), not a state dict.
        FormatError: torch itself could not read it.
    """
    zd = zd or read_directory(path, src)
    budget = InflateBudget.for_file(src.size)
    prefix = torch_prefix(zd)
    script = find_torchscript(path, src, zd, prefix, budget)
    bad = anomalies(zd, prefix, compressed_under=script.code_folder if script else ())
    if script is not None:
        raise script.refusal(path, bad)
    prefix = find_prefix(path, zd)
    if bad:
        member, problem = bad[0]
        what = "the zip archive" if member == "(archive)" else f"zip member {member!r}"
        raise UnsafeFileError(path, f"refused to load: {what} is inconsistent ({problem})")
    if zd.broken:
        raise FormatError(path, zd.broken[0])
    byteorder = read_byteorder(path, src, zd, prefix, budget)
    try:
        root, storages = run_data_pkl(path, src, zd, prefix, refuse(path), budget=budget)
    except PickleError as exc:
        raise reader_error(path, exc, "data.pkl") from None
    for ref in storages.values():
        ref.byteorder = byteorder
    if not allow_hidden:
        refuse_hidden_pickles(path, src, zd, zd.lookup(prefix + "data.pkl"), budget)

    def locate(ref: StorageRef) -> tuple[int, int, Any]:
        if ref.file_offset is not None and ref.nbytes is not None:
            # a storage of a nested _load_from_bytes stream: already located in the file
            return ref.file_offset, ref.nbytes, None
        problem = storage_problem(zd, prefix, ref)
        if problem is not None:
            raise FormatError(path, problem)
        entry = zd.lookup(f"{prefix}data/{ref.key}")
        assert entry is not None
        return _member_location(path, entry)

    flat = flatten(path, root)
    return assemble(path, "torch-zip", src, flat, locate, info={"archive_prefix": prefix.rstrip("/"), "byteorder": byteorder})


def read_byteorder(path: str, src: Source, zd: ZipDirectory, prefix: str, budget: InflateBudget) -> str:
    """The ``byteorder`` record, after the small records torch.load reads first, checked as it checks
    them (torch/serialization.py ``_load``): ``byteorder`` exactly ``little`` or ``big``, and
    ``.storage_alignment`` a number ``int()`` takes.

    Raises:
        FormatError: torch.load would fail on one of them.
    """
    align = zd.lookup(prefix + ".storage_alignment")
    if align is not None:
        raw = read_member(path, src, align, 64, budget)
        try:
            int(raw)
        except ValueError:
            raise FormatError(path, f"the archive's .storage_alignment record says {raw[:20]!r}; torch.load "
                                    "refuses it") from None
    bo = zd.lookup(prefix + "byteorder")
    if bo is None:
        return "little"
    raw = read_member(path, src, bo, 64, budget)
    if raw not in (b"little", b"big"):
        raise FormatError(path, f"the archive's byteorder record says {raw[:20]!r}; torch.load refuses it")
    return raw.decode("ascii")


def storage_problem(zd: ZipDirectory, prefix: str, ref: StorageRef) -> str | None:
    """Why torch.load would fail on one storage data.pkl names, or None (torch requires the member
    and, reading it whole, a record of exactly the storage's size)."""
    entry = zd.lookup(f"{prefix}data/{ref.key}")
    if entry is None:
        return f"storage {ref.key!r} is missing from the archive (no {prefix}data/{ref.key})"
    need = ref.numel * ref.dtype.itemsize
    if entry.size != need:
        return (f"storage {ref.key!r} should hold {need} bytes but its member records {entry.size}; torch.load "
                "(without mmap) refuses it")
    return None


def _member_location(path: str, entry: ZipEntry) -> tuple[int, int, Any]:
    if entry.encrypted:
        raise FormatError(path, f"zip member {entry.name!r} is encrypted")
    if entry.method == 0:
        return entry.data_offset, entry.size, None
    if entry.method == 8:
        return entry.data_offset, entry.size, (entry.data_offset, entry.compressed_size, entry.size, entry.crc)
    raise FormatError(path, f"zip member {entry.name!r} uses compression method {entry.method}")


# -- TorchScript ---------------------------------------------------------------------------------

#: Globals torch.jit.load's C++ unpickler resolves itself (TorchScript classes, list builders);
#: nothing is imported for them (torch/csrc/jit/serialization/unpickler.cpp ``readGlobal``).
TORCHSCRIPT_GLOBALS = ("__torch__.", "torch.jit._pickle.")
TORCHSCRIPT_EXACT = frozenset({"__main__.TensorID", "__main__.IntList", "builtins.complex"})


def torchscript_global(qualified: str) -> bool:
    """Is ``module.name`` one that torch.jit.load resolves without importing anything?"""
    return qualified.startswith(TORCHSCRIPT_GLOBALS) or qualified in TORCHSCRIPT_EXACT


@dataclass(frozen=True)
class TorchScript:
    """A TorchScript archive (``torch.jit.save``), as torch.load recognises it."""

    prefix: str
    code: tuple[str, ...]  # members jit.load compiles as code
    setstate: tuple[str, ...]  # code members that define __setstate__, which jit.load runs

    @property
    def code_folder(self) -> tuple[str, ...]:
        return (self.prefix + "code/",)

    def refusal(self, path: str, bad: list[tuple[str, str]]) -> FormatError | UnsafeFileError:
        what = "a TorchScript program (torch.jit.save output), not a state dict"
        if self.setstate:
            return UnsafeFileError(path, f"refused to load: {what}; its code defines __setstate__ "
                                         f"({self.setstate[0]}), which torch.jit.load runs while loading")
        if bad:
            member, problem = bad[0]
            part = "the zip archive" if member == "(archive)" else f"zip member {member!r}"
            return UnsafeFileError(path, f"refused to load: {what}, and {part} is inconsistent ({problem})")
        return UnsupportedFormatError(path, f"{what}; modelkit reads weights, not programs",
                                      "Load it with torch.jit.load only if you trust its source, then save its "
                                      "state_dict() with safetensors")


def is_torchscript(zd: ZipDirectory, prefix: str | None) -> bool:
    """torch.load's own test (``_is_torchscript_zip``): a record named exactly ``constants.pkl``
    (names are taken after the top folder and end at a NUL, as ``getAllRecords`` returns them)."""
    if prefix is None:
        return False
    return any(e.name.startswith(prefix) and e.name[len(prefix):].split("\0")[0] == "constants.pkl"
               for e in zd.entries)


def find_torchscript(path: str, src: Source, zd: ZipDirectory, prefix: str | None,
                     budget: InflateBudget) -> TorchScript | None:
    """The TorchScript program in the archive, if torch.load would hand it to torch.jit.load.

    jit.load (torch/csrc/jit/serialization/import.cpp) compiles the classes it meets from
    ``code/`` (found without regard to ASCII case, as miniz finds names), or follows a legacy
    ``model.json``; while unpickling it runs ``__setstate__`` for each object whose class defines
    one (``ObjLoaderFunc``; ``LEGACY_moduleSetState``). Its pickles are read by a C++ unpickler
    that imports no Python. So every member but the tensor data is searched for ``__setstate__``.
    """
    if prefix is None or not is_torchscript(zd, prefix):
        return None
    code: list[str] = []
    setstate: list[str] = []
    for e in zd.entries:
        rel = fold(e.name[len(prefix):]) if e.name.startswith(prefix) else fold(e.name)
        if rel.startswith(("code/", "model.json")) or rel.endswith(".py"):
            code.append(e.name)
        if rel.startswith(("data/", "tensors/")):
            continue
        try:
            if contains(path, src, e, b"__setstate__", budget):
                setstate.append(e.name)
        except ResourceLimitError:
            raise
        except FormatError:
            if e.name in code:
                setstate.append(e.name)  # code that cannot be read: assume the worst
    return TorchScript(prefix, tuple(code), tuple(setstate))


# -- every other member, probed as a pickle -------------------------------------------------------


def probe_member(path: str, src: Source, e: ZipEntry, budget: InflateBudget) -> tuple[Probe, MemberBytes | None]:
    """Probe one member as a pickle: ``.pkl`` members whole, others from their first bytes, read
    further only while the probe keeps running (tensor bytes stop it within a few bytes).

    Returns:
        (probe, the member's bytes when they were read whole, else None).

    Raises:
        FormatError: torch could not read the member.
        ResourceLimitError: inflating it ran past the budget.
    """
    base = e.data_offset if e.method == 0 else 0
    length = e.compressed_size if e.method == 0 else e.size
    if not e.name.endswith(".pkl"):
        for step in HEAD_STEPS:
            head = member_head(path, src, e, step, budget)
            p = probe(head, base)
            # Read on only while the pickle could still end inside this member.
            needed = p.error.needed if p.error is not None else None
            if needed is not None and needed > base + length:
                return p, None
            if not (p.error is not None and p.error.kind == "truncated" and len(head) == step):
                return p, None
    whole = member_bytes(path, src, e, budget)
    return probe(whole.data, base, keep_blobs=True), whole


def probe_members(path: str, src: Source, zd: ZipDirectory, skip: ZipEntry | None,
                  budget: InflateBudget | None = None) -> list[tuple[ZipEntry, Probe]]:
    """Probe every member but ``skip`` (data.pkl) as a pickle (see ``probe_member``).

    Returns:
        (member, probe) for each member the probe could run on.
    """
    budget = budget or InflateBudget()
    out: list[tuple[ZipEntry, Probe]] = []
    for e in zd.entries:
        if e is skip:
            continue
        try:
            out.append((e, probe_member(path, src, e, budget)[0]))
        except ResourceLimitError:
            raise
        except FormatError:
            continue
    return out


def refuse_hidden_pickles(path: str, src: Source, zd: ZipDirectory, skip: ZipEntry | None,
                          budget: InflateBudget | None = None) -> None:
    """The reader's side of ``probe_members``: refuse an archive that hides a payload anywhere."""
    for e, p in probe_members(path, src, zd, skip, budget):
        if p.dangerous:
            module, name, off = p.dangerous[0]
            raise UnsafeFileError(path, f"refused to load: member {e.name!r} holds a pickle that names {module}.{name} "
                                        f"(at byte {off})", global_name=f"{module}.{name}")
