"""The static scanner: every pickle stream in every container, run on the symbolic VM.

The VM and the allow-list are the safe reader's own (``modelkit.formats``), run in *collect*
mode: a global outside the table becomes a finding and a symbolic value, and the walk goes on,
so one file yields all its evidence. Nothing from the file is imported or called, and this
module never imports torch.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import FormatError, ModelkitError, UnsafeFileError
from ..formats.numpy_file import NPY_MAGIC, parse_npy_header
from ..formats.pickle_vm import COMPUTED, PickleError, PickleVM, looks_like_pickle
from ..formats.sniff import sniff
from ..formats.unpickler import ALLOWED, collect, make_policy
from ..model import Source
from . import rules as R
from .report import FileReport, Finding, ScanReport, combine

MAX_CONCATENATED = 64


class _Ctx:
    def __init__(self, path: str):
        self.path = path
        self.findings: list[Finding] = []
        self.pickles = 0
        self.globals: list[str] = []
        self._placeholders: set[str] = set()

    def add(self, rule: R.Rule, message: str, member: str | None = None, offset: int | None = None,
            global_name: str | None = None, severity: str | None = None) -> None:
        self.findings.append(Finding(rule.id, severity or rule.severity, message, member, offset, global_name))

    def run_pickle(self, data: Any, member: str, base: int, persistent_load: Callable[[Any], Any] | None) -> int | None:
        """Scan one pickle stream; returns its end (relative to ``data``) or None on error."""
        found: list[tuple[str, str, int]] = []
        vm = PickleVM(data, make_policy(collect(found), persistent_load), base_offset=base)
        self.pickles += 1
        end: int | None = None
        try:
            vm.run()
            end = vm.pos
        except PickleError as exc:
            rule = R.RESOURCE_LIMIT if exc.kind == "limit" else R.PICKLE_ERROR
            self.add(rule, f"{exc}", member, exc.offset)
        self.note_globals(vm.globals_seen, found, member)
        return end

    def note_globals(self, seen: Iterable[tuple[str, str, int]], refused: list[tuple[str, str, int]],
                     member: str) -> None:
        for module, name, _off in seen:
            q = _qual(module, name)
            if q not in self.globals:
                self.globals.append(q)
            entry = ALLOWED.get((module, name))
            if entry is not None and entry.role == "placeholder" and q not in self._placeholders:
                self._placeholders.add(q)
                self.add(R.PLACEHOLDER_GLOBAL, f"{q} (loaded as an inert placeholder)", member, global_name=q)
        for module, name, off in refused:
            if module == COMPUTED:
                self.add(R.DYNAMIC_NAME, f"STACK_GLOBAL with a computed name {name}", member, off)
            elif module == "copyreg.extension":
                self.add(R.EXTENSION_CODE, f"extension code {name}", member, off)
            else:
                sev, what = R.explain_global(module, name)
                q = _qual(module, name)
                self.add(R.UNSAFE_GLOBAL, f"{q}: {what}", member, off, q, severity=sev)


def _qual(module: str, name: str) -> str:
    q = f"{module}.{name}"
    if q.isprintable() and len(q) <= 200:
        return q
    return ascii(q)[:200]


def scan_file(path: str | os.PathLike[str]) -> FileReport:
    """Scan one file statically.

    Returns:
        A FileReport whose verdict is ``safe``, ``suspicious``, ``unsafe`` or ``error``. An
        exception inside the scanner is reported as ``error`` for this file, never raised.

    Example:
        >>> modelkit.scan.scan_file("model.ckpt").verdict  # doctest: +SKIP
        'safe'
    """
    p = os.fspath(path)
    ctx = _Ctx(p)
    container: str | None = None
    try:
        container = sniff(p)
        src = Source(p)
        try:
            _SCANNERS[container](ctx, src)
        finally:
            src.close()
    except UnsafeFileError as exc:
        ctx.add(R.OBJECT_ARRAY if "object" in exc.problem else R.UNSAFE_GLOBAL, exc.problem)
    except FormatError as exc:
        ctx.add(R.NOT_MODEL if container is None else R.HEADER_ERROR, exc.problem)
    except ModelkitError as exc:
        ctx.add(R.NOT_MODEL, exc.problem)
    except Exception as exc:  # noqa: BLE001 - a scanner crash must not let a file through
        ctx.add(R.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    return FileReport(p, container, combine(ctx.findings), tuple(ctx.findings), ctx.pickles, tuple(ctx.globals))


def scan(paths: Iterable[str | os.PathLike[str]]) -> ScanReport:
    """Scan files and folders (folders are walked for model files)."""
    from ..paths import iter_inputs

    return ScanReport(tuple(scan_file(f) for f in iter_inputs(paths)))


# -- per-container scanners ------------------------------------------------------------------------


def _scan_safetensors(ctx: _Ctx, src: Source) -> None:
    from ..formats.safetensors_file import parse_header

    parse_header(ctx.path, src)


def _scan_zip(ctx: _Ctx, src: Source) -> None:
    from ..formats.torch_zip import storage_loader
    from ..formats.zipdir import anomalies, read_directory, read_member

    try:
        zd = read_directory(ctx.path, src)
    except FormatError as exc:
        ctx.add(R.ZIP_ERROR, exc.problem)
        return
    npz = bool(zd.entries) and all(e.name.endswith(".npy") for e in zd.entries)
    if npz:
        for e in zd.entries:
            for member, problem in anomalies(zd, None, allow_compressed=True):
                ctx.add(R.ZIP_ANOMALY, problem, member)
            _scan_npy_bytes(ctx, read_member(ctx.path, src, e), e.name, e.data_offset if e.method == 0 else None)
        return
    pkls = [e for e in zd.entries if e.name.endswith("/data.pkl") and e.name.count("/") == 1]
    prefix = pkls[0].name[: -len("data.pkl")] if len(pkls) == 1 else None
    for member, problem in anomalies(zd, prefix):
        ctx.add(R.ZIP_ANOMALY, problem, member)
    if not pkls:
        ctx.add(R.ZIP_ERROR, "the zip archive has no data.pkl, so it is not a PyTorch file")
    for e in zd.entries:
        head = src.pread(min(2, e.compressed_size), e.data_offset) if e.method == 0 else b""
        if not (e.name.endswith(".pkl") or looks_like_pickle(head) or e.method != 0):
            continue
        try:
            data = read_member(ctx.path, src, e)
        except FormatError as exc:
            ctx.add(R.ZIP_ERROR, exc.problem, e.name)
            continue
        if not (e.name.endswith(".pkl") or looks_like_pickle(data[:2])):
            continue
        base = e.data_offset if e.method == 0 else 0
        if e.name.endswith(".pkl"):
            pload = storage_loader(ctx.path, {}) if e.name.endswith("data.pkl") else None
            _scan_stream_chain(ctx, data, e.name, base, pload)
            continue
        # Sniffed by content only: raw storage bytes often start like a pickle by chance, so a
        # member counts as a pickle only if it runs to a STOP.
        probe = _Ctx(ctx.path)
        if probe.run_pickle(data, e.name, base, None) is not None:
            ctx.findings.extend(probe.findings)
            ctx.pickles += 1
            ctx.globals.extend(g for g in probe.globals if g not in ctx.globals)


def _scan_stream_chain(ctx: _Ctx, data: Any, member: str, base: int, pload: Any) -> None:
    """Scan a pickle and any pickles concatenated after it."""
    pos = 0
    for i in range(MAX_CONCATENATED):
        view = data[pos:] if isinstance(data, bytes) else data
        end = ctx.run_pickle(view, member if i == 0 else f"{member} (pickle #{i + 1})", base + pos, pload)
        if end is None:
            return
        pos += end
        rest = len(data) - pos
        if rest <= 0:
            return
        nxt = bytes(data[pos : pos + 2])
        if not looks_like_pickle(nxt):
            ctx.add(R.TRAILING_PICKLE, f"{rest} bytes follow the pickle's STOP", member, base + pos)
            return
        ctx.add(R.TRAILING_PICKLE, "another pickle follows the first one; it is scanned too", member, base + pos)


def _scan_legacy(ctx: _Ctx, src: Source) -> None:
    import mmap

    from ..formats.torch_legacy import parse_stream

    found: list[tuple[str, str, int]] = []
    seen: list[tuple[str, str, int]] = []
    with mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ) as mm:
        hook = collect(found)
        try:
            stream = parse_stream(mm, hook, scan_globals=seen)
            ctx.pickles += len(stream.pickle_spans)
        except PickleError as exc:
            rule = R.RESOURCE_LIMIT if exc.kind == "limit" else R.PICKLE_ERROR
            ctx.add(rule, str(exc), "legacy stream", exc.offset)
    ctx.note_globals(seen, found, "legacy stream")


def _scan_pickle(ctx: _Ctx, src: Source) -> None:
    import mmap

    with mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ) as mm:
        _scan_stream_chain(ctx, bytes(mm), "pickle", 0, None)


def _scan_npy(ctx: _Ctx, src: Source) -> None:
    _scan_npy_bytes(ctx, src.pread(src.size, 0), "array", 0)


def _scan_npy_bytes(ctx: _Ctx, data: bytes, member: str, base: int | None) -> None:
    if not data.startswith(NPY_MAGIC):
        ctx.add(R.HEADER_ERROR, "not an .npy array", member)
        return
    try:
        parse_npy_header(ctx.path, data[: (1 << 20) + 16], member)
    except UnsafeFileError:
        ctx.add(R.OBJECT_ARRAY, "an object array: its data is a pickle", member)
        hlen = _npy_header_end(data)
        if hlen:
            _scan_stream_chain(ctx, data[hlen:], member, (base or 0) + hlen, None)
    except FormatError as exc:
        ctx.add(R.HEADER_ERROR, exc.problem, member)


def _npy_header_end(data: bytes) -> int:
    import struct

    if len(data) < 12:
        return 0
    if data[6] == 1:
        return 10 + int(struct.unpack("<H", data[8:10])[0])
    return 12 + int(struct.unpack("<I", data[8:12])[0])


def _scan_tar(ctx: _Ctx, src: Source) -> None:
    # Old (torch < 0.4) tar checkpoints: members sys_info, pickle, storages, tensors.
    try:
        with tarfile.open(ctx.path, mode="r:") as tf:
            for m in tf.getmembers():
                if not m.isfile():
                    continue
                f = tf.extractfile(m)
                if f is None:
                    continue
                data = f.read()
                if looks_like_pickle(data[:2]):
                    ctx.run_pickle(data, m.name, m.offset_data, None)
    except tarfile.TarError as exc:
        ctx.add(R.ZIP_ERROR, f"the tar archive is corrupt ({exc})")


_SCANNERS: dict[str, Callable[[_Ctx, Source], None]] = {
    "safetensors": _scan_safetensors,
    "zip": _scan_zip,
    "torch-legacy": _scan_legacy,
    "pickle": _scan_pickle,
    "npy": _scan_npy,
    "tar": _scan_tar,
}
