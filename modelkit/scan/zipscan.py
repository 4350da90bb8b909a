"""Scanning zip archives as torch reads them, and as every other reader could.

Every central directory a reader can find is scanned (``formats.zipdir.read_archive``): the one
torch's miniz reads, zipfile's, and those of stray end records. Each disagreement between them
is a ``ZIP_ANOMALY``. Members are read the way torch reads them (central sizes, data after the
local header); deflated members stream through one ``InflateBudget`` per scan, so a zip bomb
ends in a ``RESOURCE_LIMIT`` finding, never in gigabytes of memory.

A TorchScript archive (``torch.jit.save``) is its own finding: torch.load hands it to
torch.jit.load, which runs the ``__setstate__`` of its code while loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from ..errors import FormatError, ResourceLimitError
from ..formats.torch_zip import (
    TorchScript,
    find_torchscript,
    is_torchscript,
    probe_member,
    read_byteorder,
    storage_loader,
    storage_problem,
    torchscript_global,
)
from ..formats.unpickler import StorageRef
from ..formats.zipdir import (
    InflateBudget,
    ZipDirectory,
    ZipEntry,
    anomalies,
    member_bytes,
    member_head,
    read_archive,
    torch_prefix,
)
from ..model import MemorySource, Source
from . import rules as R
from .report import Finding

if TYPE_CHECKING:
    from .engine import _Ctx

_BUDGETS: WeakKeyDictionary[Any, InflateBudget] = WeakKeyDictionary()
NPY_HEAD = (1 << 20) + 16
ARCHIVE = "(archive)"  # what ``anomalies`` calls the archive as a whole


def budget_for(ctx: _Ctx, src: Source) -> InflateBudget:
    """The inflate budget of one scan, set by the first archive the scan opens (the file itself, or
    the outermost one) and shared by nested and polyglot archives of the same file."""
    budget = _BUDGETS.get(ctx)
    if budget is None:
        budget = _BUDGETS[ctx] = InflateBudget.for_file(src.size)
    return budget


def scan_zip(ctx: _Ctx, src: Source, depth: int) -> None:
    """Scan every central directory of a zip archive; findings go to ``ctx``."""
    from .engine import _m

    outer = src.path if isinstance(src, MemorySource) else None  # how findings name the archive itself
    arc = read_archive(src.path, src)
    if arc.limit is not None:
        ctx.add(R.RESOURCE_LIMIT, arc.limit.problem, outer)
    if arc.torch is None:
        if arc.error is not None and arc.error is not arc.limit:
            ctx.add(R.ZIP_ERROR, arc.error.problem, outer)
        for zd in arc.others:
            ctx.add(R.ZIP_ANOMALY, f"torch cannot open the archive, but {zd.label} finds a central directory in it",
                    outer)
    budget = budget_for(ctx, src)
    for zd in [arc.torch] if arc.torch is not None else []:
        _scan_members(ctx, src, zd, depth, budget, lambda name: _m(src, name), outer)
    for zd in arc.others:
        label = zd.label

        def other(name: str, label: str = label) -> str:
            return _m(src, f"{name} [directory of {label}]")

        _scan_members(ctx, src, zd, depth, budget, other, other(ARCHIVE))


def _over_budget(ctx: _Ctx, budget: InflateBudget, exc: ResourceLimitError, member: str | None) -> None:
    """Report the inflate budget running out, once per scan; stored members are still scanned."""
    if not budget.reported:
        budget.reported = True
        ctx.add(R.RESOURCE_LIMIT, exc.problem, member)


def _scan_members(ctx: _Ctx, src: Source, zd: ZipDirectory, depth: int, budget: InflateBudget,
                  label: Callable[[str], str], archive: str | None) -> None:
    """Scan one directory's members; ``label`` names a member in findings, ``archive`` the whole."""
    from .engine import _scan_stream_chain

    main = zd.label == "torch"
    for problem in zd.broken:
        ctx.add(R.ZIP_ERROR, problem, archive)
    if zd.entries and all(e.name.endswith(".npy") for e in zd.entries):
        if main:
            for member, problem in anomalies(zd, None, allow_compressed=True):
                ctx.add(R.ZIP_ANOMALY, problem, archive if member == ARCHIVE else label(member))
        for e in zd.entries:
            try:
                _scan_npz_member(ctx, src, e, depth, budget, label(e.name))
            except ResourceLimitError as exc:
                _over_budget(ctx, budget, exc, label(e.name))
        return
    prefix = torch_prefix(zd)  # the folder torch reads, from the first member
    try:
        script = find_torchscript(src.path, src, zd, prefix, budget)
    except ResourceLimitError as exc:
        _over_budget(ctx, budget, exc, archive)
        script = TorchScript(prefix or "", (), ()) if is_torchscript(zd, prefix) else None
    if main:
        for member, problem in anomalies(zd, prefix, compressed_under=script.code_folder if script else ()):
            ctx.add(R.ZIP_ANOMALY, problem, archive if member == ARCHIVE else label(member))
    first = len(ctx.findings)
    if script is not None:
        ctx.add(R.TORCHSCRIPT, "a TorchScript program (torch.jit.save), not a state dict: torch.load hands it to "
                               f"torch.jit.load, which compiles its code ({len(script.code)} files)", archive)
        for name in script.setstate:
            ctx.add(R.TORCHSCRIPT_CODE, "its code defines __setstate__, which torch.jit.load runs while loading",
                    label(name))
    data_pkl = zd.lookup(prefix + "data.pkl") if prefix else None
    if data_pkl is None and script is None:
        ctx.add(R.ZIP_ERROR, "torch finds no data.pkl in this zip archive, so it is not a PyTorch file",
                archive)
    for e in ([data_pkl] if data_pkl is not None else []) + [e for e in zd.entries if e is not data_pkl]:
        try:
            if e is data_pkl:
                data = _whole(ctx, src, e, budget, label)
                if data is not None:
                    storages: dict[str, StorageRef] = {}
                    base = e.data_offset if e.method == 0 else 0
                    _scan_stream_chain(ctx, data, label(e.name), base, storage_loader(src.path, storages), depth)
                    if main and script is None and prefix is not None:  # what makes torch.load fail
                        _check_storages(ctx, zd, prefix, storages, label)
            else:
                _scan_member(ctx, src, e, depth, budget, label)
        except ResourceLimitError as exc:
            _over_budget(ctx, budget, exc, label(e.name))
    if main and script is None and data_pkl is not None and prefix is not None:
        _check_records(ctx, src, zd, prefix, budget, archive)
    if script is not None:
        _drop_torchscript_globals(ctx, first)


def _whole(ctx: _Ctx, src: Source, e: ZipEntry, budget: InflateBudget, label: Callable[[str], str]) -> bytes | None:
    """The whole member as far as any reader could read it; each way torch reads it otherwise is an
    anomaly. None (with an error finding) when torch cannot read it at all."""
    try:
        got = member_bytes(src.path, src, e, budget)
    except ResourceLimitError:
        raise
    except FormatError as exc:
        ctx.add(R.ZIP_ERROR, exc.problem, label(e.name))
        return None
    for problem in got.problems:
        ctx.add(R.ZIP_ANOMALY, problem, label(e.name))
    return got.data


def _scan_member(ctx: _Ctx, src: Source, e: ZipEntry, depth: int, budget: InflateBudget,
                 label: Callable[[str], str]) -> None:
    """Any member a loader could unpickle: ``.pkl`` members scanned whole, others probed from
    their first bytes (tensor bytes make noise, so only importable globals count there)."""
    try:
        p, whole = probe_member(src.path, src, e, budget)
    except ResourceLimitError:
        raise
    except FormatError:
        return  # encrypted or unknown method: flagged by the anomalies, unreadable by torch
    if whole is not None:
        for problem in whole.problems:
            ctx.add(R.ZIP_ANOMALY, problem, label(e.name))
    if p.is_pickle and whole is not None and e.name.endswith(".pkl"):
        ctx.run_pickle(whole.data, label(e.name), e.data_offset if e.method == 0 else 0, None, depth)
    elif p.dangerous or p.blobs:
        ctx.pickles += 1
        ctx.note_probe(p, label(e.name), b"", 0, depth)


def _scan_npz_member(ctx: _Ctx, src: Source, e: ZipEntry, depth: int, budget: InflateBudget, member: str) -> None:
    """An .npy member: its header only, unless it is an object array (then its pickle, whole)."""
    from ..errors import UnsafeFileError
    from ..formats.numpy_file import parse_npy_header
    from .engine import _scan_npy_bytes

    base = e.data_offset if e.method == 0 else 0
    try:
        head = member_head(src.path, src, e, NPY_HEAD, budget)
    except ResourceLimitError:
        raise
    except FormatError as exc:
        ctx.add(R.ZIP_ERROR, exc.problem, member)
        return
    try:
        parse_npy_header(src.path, head, e.name)
    except UnsafeFileError:
        pass  # an object (or structured) array: its data is a pickle, scanned whole below
    except FormatError:
        _scan_npy_bytes(ctx, head, member, base, depth)
        return
    else:
        return
    try:
        got = member_bytes(src.path, src, e, budget)
    except ResourceLimitError:
        _scan_npy_bytes(ctx, head, member, base, depth)  # the object array, and its pickle as far as read
        raise
    except FormatError as exc:
        ctx.add(R.ZIP_ERROR, exc.problem, member)
        _scan_npy_bytes(ctx, head, member, base, depth)
        return
    for problem in got.problems:
        ctx.add(R.ZIP_ANOMALY, problem, member)
    _scan_npy_bytes(ctx, got.data, member, base, depth)


def _check_storages(ctx: _Ctx, zd: ZipDirectory, prefix: str, storages: dict[str, StorageRef],
                    label: Callable[[str], str]) -> None:
    """What the reader checks of each storage data.pkl names: torch.load fails where it fails."""
    for ref in storages.values():
        problem = storage_problem(zd, prefix, ref)
        if problem is not None:
            ctx.add(R.ZIP_ERROR, problem, label(f"{prefix}data/{ref.key}"))


def _check_records(ctx: _Ctx, src: Source, zd: ZipDirectory, prefix: str, budget: InflateBudget,
                   archive: str | None) -> None:
    """The small records torch.load reads before data.pkl (byteorder, storage alignment)."""
    try:
        read_byteorder(src.path, src, zd, prefix, budget)
    except ResourceLimitError as exc:
        _over_budget(ctx, budget, exc, archive)
    except FormatError as exc:
        ctx.add(R.ZIP_ERROR, exc.problem, archive)


def _drop_torchscript_globals(ctx: _Ctx, first: int) -> None:
    """In a TorchScript archive, globals that torch.jit.load resolves itself import nothing (its
    C++ unpickler has no Python import); they are part of the TorchScript finding, not apart."""

    def keep(f: Finding) -> bool:
        return not (f.rule == R.UNSAFE_GLOBAL.id and f.global_name is not None and torchscript_global(f.global_name))

    ctx.findings[first:] = [f for f in ctx.findings[first:] if keep(f)]
