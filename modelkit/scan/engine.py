"""The static scanner: every pickle stream in every container, run on the symbolic VM.

The VM and the allow-list are the safe reader's own (``modelkit.formats``), run in *collect*
mode: a global outside the table becomes a finding and a symbolic value, and the walk goes on,
so one file yields all its evidence. Nothing from the file is imported or called, and this
module never imports torch.

Containers are recognised by content. Compressed wrappers (gzip, bzip2, xz) are opened with a
bounded output and scanned inside; byte constants inside a pickle that are themselves a pickle
or a zip are scanned too, to a bounded depth.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import mmap
import os
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import FormatError, ModelkitError, UnsafeFileError
from ..formats.numpy_file import NPY_MAGIC, parse_npy_header
from ..formats.pickle_vm import COMPUTED, OPCODE_NAMES, PickleError, PickleVM, looks_like_pickle
from ..formats.sniff import sniff, sniff_bytes
from ..formats.unpickler import ALLOWED, collect, make_policy
from ..model import MemorySource, Source
from . import rules as R
from .report import FileReport, Finding, ScanReport, combine

MAX_CONCATENATED = 64
MAX_DEPTH = 3
MAX_UNWRAP = 512 * 1024 * 1024


class _Ctx:
    def __init__(self, path: str, allow: frozenset[str]):
        self.path = path
        self.allow = allow
        self.findings: list[Finding] = []
        self.pickles = 0
        self.globals: list[str] = []
        self._placeholders: set[str] = set()

    def add(self, rule: R.Rule, message: str, member: str | None = None, offset: int | None = None,
            global_name: str | None = None, severity: str | None = None, opcode: str | None = None) -> None:
        self.findings.append(Finding(rule.id, severity or rule.severity, message, member, offset, global_name, opcode))

    def run_pickle(self, data: Any, member: str, base: int, persistent_load: Callable[[Any], Any] | None,
                   depth: int = 0) -> int | None:
        """Scan one pickle stream; returns its end (relative to ``data``) or None on error."""
        found: list[tuple[str, str, int]] = []
        vm = PickleVM(data, make_policy(collect(found), persistent_load), base_offset=base)
        vm.blobs = []
        self.pickles += 1
        end: int | None = None
        try:
            vm.run()
            end = vm.pos
        except PickleError as exc:
            rule = R.RESOURCE_LIMIT if exc.kind == "limit" else R.PICKLE_ERROR
            self.add(rule, f"{exc}", member, exc.offset, opcode=_opcode_at(data, exc.offset - base))
        self.note_globals(vm.globals_seen, found, member, lambda off: _opcode_at(data, off - base))
        for blob in vm.blobs:
            self.scan_blob(blob, member, depth + 1)
        return end

    def scan_blob(self, blob: bytes, member: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.add(R.RESOURCE_LIMIT, f"nesting deeper than {MAX_DEPTH} levels was not scanned", member)
            return
        offset = getattr(blob, "offset", None)
        label = f"{member} > bytes@{offset}" if offset is not None else f"{member} > bytes"
        kind = sniff_bytes(bytes(blob[:512]), len(blob))
        if kind.startswith("unknown"):
            return
        self.add(R.NESTED, f"a {len(blob)}-byte constant is a {kind} stream; scanned", member, offset)
        _scan_source(self, MemorySource(bytes(blob), label), kind, depth)

    def note_globals(self, seen: Iterable[tuple[str, str, int]], refused: list[tuple[str, str, int]],
                     member: str, opcode_at: Callable[[int], str | None] = lambda off: None) -> None:
        for module, name, _off in seen:
            q = _qual(module, name)
            if q not in self.globals:
                self.globals.append(q)
            entry = ALLOWED.get((module, name))
            if entry is not None and entry.role == "placeholder" and q not in self._placeholders:
                self._placeholders.add(q)
                self.add(R.PLACEHOLDER_GLOBAL, f"{q} (loaded as an inert placeholder)", member, global_name=q)
        for module, name, off in refused:
            op = opcode_at(off)
            if module == COMPUTED:
                self.add(R.DYNAMIC_NAME, f"STACK_GLOBAL with a computed name {name}", member, off, opcode=op)
            elif module == "copyreg.extension":
                self.add(R.EXTENSION_CODE, f"extension code {name}", member, off, opcode=op)
            elif f"{module}.{name}" in self.allow:
                q = _qual(module, name)
                self.add(R.USER_ALLOWED, f"{q} (allowed by --allow)", member, off, q, opcode=op)
            else:
                sev, what = R.explain_global(module, name)
                q = _qual(module, name)
                self.add(R.UNSAFE_GLOBAL, f"{q}: {what}", member, off, q, severity=sev, opcode=op)


def _opcode_at(data: Any, rel: int) -> str | None:
    try:
        return OPCODE_NAMES.get(data[rel]) if 0 <= rel < len(data) else None
    except (IndexError, TypeError, ValueError):
        return None


def _qual(module: str, name: str) -> str:
    q = f"{module}.{name}"
    if q.isprintable() and len(q) <= 200:
        return q
    return ascii(q)[:200]


def scan_file(path: str | os.PathLike[str], allow: Iterable[str] = (), require_safetensors: bool = False) -> FileReport:
    """Scan one file statically.

    Args:
        path: the file.
        allow: audited ``module.name`` globals to accept for this scan (reported, never silent).
        require_safetensors: any container but safetensors is a finding (a repository policy).

    Returns:
        A FileReport whose verdict is ``safe``, ``suspicious``, ``unsafe`` or ``error``. An
        exception inside the scanner is reported as ``error`` for this file, never raised.

    Example:
        >>> modelkit.scan.scan_file("model.ckpt").verdict  # doctest: +SKIP
        'safe'
    """
    p = os.fspath(path)
    ctx = _Ctx(p, frozenset(allow))
    container: str | None = None
    try:
        container = sniff(p, wrappers=True)
        src = Source(p)
        try:
            _scan_source(ctx, src, container, 0)
        finally:
            src.close()
    except ModelkitError as exc:
        ctx.add(R.NOT_MODEL if container is None else R.HEADER_ERROR, exc.problem)
    except Exception as exc:  # noqa: BLE001 - a scanner crash must not let a file through
        ctx.add(R.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    if require_safetensors and container not in (None, "safetensors"):
        ctx.add(R.PICKLE_FORMAT, f"a {container} file; only .safetensors model files are allowed here")
    return FileReport(p, container, combine(ctx.findings), tuple(ctx.findings), ctx.pickles, tuple(ctx.globals))


def _scan_one(args: tuple[str, tuple[str, ...], bool]) -> FileReport:
    return scan_file(*args)


def scan(paths: Iterable[str | os.PathLike[str]], allow: Iterable[str] = (), jobs: int = 1,
         strict: bool = False, require_safetensors: bool = False) -> ScanReport:
    """Scan files and folders (folders are walked for model files, no symlink followed).

    Args:
        paths: files or folders.
        allow: audited ``module.name`` exceptions.
        jobs: worker processes for many files.
        strict: make ``suspicious`` files count as findings in the exit code.
        require_safetensors: reject every model file that is not safetensors.
    """
    from ..paths import iter_inputs

    files = list(iter_inputs(paths))
    allowed = tuple(sorted(set(allow)))
    return ScanReport(tuple(scan_many(files, allowed, jobs, require_safetensors)), allowed, strict)


def scan_many(files: list[str], allow: tuple[str, ...], jobs: int, require_safetensors: bool = False
              ) -> Iterable[FileReport]:
    """Yield reports in input order, scanning with ``jobs`` processes."""
    if jobs <= 1 or len(files) < 2:
        for f in files:
            yield scan_file(f, allow, require_safetensors)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_scan_one, [(f, allow, require_safetensors) for f in files], chunksize=4)


# -- per-container scanners ------------------------------------------------------------------------


def _scan_source(ctx: _Ctx, src: Source, kind: str, depth: int) -> None:
    scanner = _SCANNERS.get(kind)
    if scanner is None:
        if kind.startswith("wrapped:"):
            _scan_wrapped(ctx, src, kind[8:], depth)
            return
        ctx.add(R.NOT_MODEL, f"not a model file ({kind.split(':', 1)[-1]})")
        return
    try:
        scanner(ctx, src, depth)
    except UnsafeFileError as exc:
        ctx.add(R.OBJECT_ARRAY if "object" in exc.problem else R.UNSAFE_GLOBAL, exc.problem, src.path)
    except FormatError as exc:
        ctx.add(R.HEADER_ERROR, exc.problem, src.path if src.fd < 0 else None)


def _m(src: Source, member: str) -> str:
    """A member label; for nested or unwrapped data it says where the data came from."""
    return f"{src.path} > {member}" if isinstance(src, MemorySource) else member


def _data(src: Source) -> Any:
    if isinstance(src, MemorySource):
        return src.data
    return mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ)


def _scan_safetensors(ctx: _Ctx, src: Source, depth: int) -> None:
    from ..formats.safetensors_file import parse_header

    parse_header(src.path, src)


def _scan_zip(ctx: _Ctx, src: Source, depth: int) -> None:
    from ..formats.torch_zip import storage_loader
    from ..formats.zipdir import anomalies, read_directory, read_member

    try:
        zd = read_directory(src.path, src)
    except FormatError as exc:
        ctx.add(R.ZIP_ERROR, exc.problem)
        return
    npz = bool(zd.entries) and all(e.name.endswith(".npy") for e in zd.entries)
    if npz:
        for member, problem in anomalies(zd, None, allow_compressed=True):
            ctx.add(R.ZIP_ANOMALY, problem, _m(src, member))
        for e in zd.entries:
            _scan_npy_bytes(ctx, read_member(src.path, src, e), _m(src, e.name), e.data_offset if e.method == 0 else 0,
                            depth)
        return
    pkls = [e for e in zd.entries if e.name.endswith("/data.pkl") and e.name.count("/") == 1]
    prefix = pkls[0].name[: -len("data.pkl")] if len(pkls) == 1 else None
    for member, problem in anomalies(zd, prefix):
        ctx.add(R.ZIP_ANOMALY, problem, _m(src, member))
    if not pkls:
        ctx.add(R.ZIP_ERROR, "the zip archive has no data.pkl, so it is not a PyTorch file")
    for e in zd.entries:
        named = e.name.endswith(".pkl")
        if not named:
            head = src.pread(min(2, e.compressed_size), e.data_offset) if e.method == 0 else b""
            if e.method == 0 and not _strong_pickle_head(head):
                continue
        try:
            data = read_member(src.path, src, e)
        except FormatError as exc:
            ctx.add(R.ZIP_ERROR, exc.problem, _m(src, e.name))
            continue
        base = e.data_offset if e.method == 0 else 0
        if named:
            pload = storage_loader(src.path, {}) if e.name.endswith("data.pkl") else None
            _scan_stream_chain(ctx, data, _m(src, e.name), base, pload, depth)
            continue
        # Sniffed by content only: storage bytes can start like a pickle by chance, so a member
        # counts as a pickle only if it runs to a STOP.
        if not _strong_pickle_head(data[:2]) and not looks_like_pickle(data[:2]):
            continue
        probe = _Ctx(ctx.path, ctx.allow)
        if probe.run_pickle(data, _m(src, e.name), base, None, depth) is not None:
            ctx.findings.extend(probe.findings)
            ctx.pickles += 1
            ctx.globals.extend(g for g in probe.globals if g not in ctx.globals)


def _strong_pickle_head(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _scan_stream_chain(ctx: _Ctx, data: Any, member: str, base: int, pload: Any, depth: int) -> int:
    """Scan a pickle and any pickles concatenated after it; returns where scanning stopped."""
    pos = 0
    for i in range(MAX_CONCATENATED):
        view = data[pos:]
        end = ctx.run_pickle(view, member if i == 0 else f"{member} (pickle #{i + 1})", base + pos, pload, depth)
        if end is None:
            return len(data)
        pos += end
        rest = len(data) - pos
        if rest <= 0:
            return pos
        nxt = bytes(data[pos : pos + 2])
        if not looks_like_pickle(nxt):
            return pos
        ctx.add(R.TRAILING_PICKLE, "another pickle follows the first one; it is scanned too", member, base + pos)
    return pos


def _scan_legacy(ctx: _Ctx, src: Source, depth: int) -> None:
    from ..formats.torch_legacy import parse_stream

    found: list[tuple[str, str, int]] = []
    seen: list[tuple[str, str, int]] = []
    label = _m(src, "legacy stream")
    data = _data(src)
    try:
        try:
            stream = parse_stream(data, collect(found), scan_globals=seen)
            ctx.pickles += len(stream.pickle_spans)
            rest = len(data) - stream.end
            if rest > 0:
                ctx.add(R.TRAILING_PICKLE, f"{rest} bytes follow the last storage", label, stream.end)
        except PickleError as exc:
            rule = R.RESOURCE_LIMIT if exc.kind == "limit" else R.PICKLE_ERROR
            ctx.add(rule, str(exc), label, exc.offset, opcode=_opcode_at(data, exc.offset))
        ctx.note_globals(seen, found, label, lambda off: _opcode_at(data, off))
        _check_polyglot(ctx, src, depth)
    finally:
        if not isinstance(data, bytes):
            data.close()


def _scan_pickle(ctx: _Ctx, src: Source, depth: int) -> None:
    data = _data(src)
    try:
        label = _m(src, "pickle")
        end = _scan_stream_chain(ctx, data, label, 0, None, depth)
        rest = len(data) - end
        if rest > 0 and not _has_zip_directory(src):
            ctx.add(R.TRAILING_PICKLE, f"{rest} bytes follow the pickle's STOP", label, end)
        _check_polyglot(ctx, src, depth)
    finally:
        if not isinstance(data, bytes):
            data.close()


def _has_zip_directory(src: Source) -> bool:
    tail = src.pread(min(src.size, 22 + 65535), max(0, src.size - 22 - 65535))
    return b"PK\x05\x06" in tail


def _check_polyglot(ctx: _Ctx, src: Source, depth: int) -> None:
    """A pickle at byte 0 with a zip directory at the end: flag it and scan the zip side too."""
    if not _has_zip_directory(src):
        return
    ctx.add(R.POLYGLOT, "a pickle at byte 0 and a zip archive at the end of the same file", src.path)
    _scan_zip(ctx, src, depth)


def _scan_npy(ctx: _Ctx, src: Source, depth: int) -> None:
    _scan_npy_bytes(ctx, src.pread(src.size, 0), _m(src, "array"), 0, depth)


def _scan_npy_bytes(ctx: _Ctx, data: bytes, member: str, base: int, depth: int) -> None:
    if not data.startswith(NPY_MAGIC):
        ctx.add(R.HEADER_ERROR, "not an .npy array", member)
        return
    try:
        parse_npy_header(ctx.path, data[: (1 << 20) + 16], member)
    except UnsafeFileError:
        ctx.add(R.OBJECT_ARRAY, "an object array: its data is a pickle", member)
        hlen = _npy_header_end(data)
        if hlen:
            _scan_stream_chain(ctx, data[hlen:], member, base + hlen, None, depth)
    except FormatError as exc:
        ctx.add(R.HEADER_ERROR, exc.problem, member)


def _npy_header_end(data: bytes) -> int:
    if len(data) < 12:
        return 0
    if data[6] == 1:
        return 10 + int(struct.unpack("<H", data[8:10])[0])
    return 12 + int(struct.unpack("<I", data[8:12])[0])


def _scan_tar(ctx: _Ctx, src: Source, depth: int) -> None:
    # Old (torch < 0.4) tar checkpoints: members sys_info, pickle, storages, tensors.
    import io

    fileobj: Any = io.BytesIO(src.data) if isinstance(src, MemorySource) else None
    try:
        with tarfile.open(src.path if fileobj is None else None, mode="r:", fileobj=fileobj) as tf:
            for m in tf.getmembers():
                if not m.isfile():
                    continue
                f = tf.extractfile(m)
                if f is None:
                    continue
                data = f.read(MAX_UNWRAP)
                if looks_like_pickle(data[:2]):
                    _scan_stream_chain(ctx, data, m.name, m.offset_data, None, depth)
    except tarfile.TarError as exc:
        ctx.add(R.ZIP_ERROR, f"the tar archive is corrupt ({exc})")


_OPENERS: dict[str, Callable[[Any], Any]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f),
    "bzip2": lambda f: bz2.BZ2File(f),
    "xz": lambda f: lzma.LZMAFile(f),
}


def _scan_wrapped(ctx: _Ctx, src: Source, fmt: str, depth: int) -> None:
    """Decompress a gzip/bzip2/xz wrapper (bounded) and scan what is inside."""
    import io

    if depth >= MAX_DEPTH:
        ctx.add(R.RESOURCE_LIMIT, f"a {fmt} wrapper nested deeper than {MAX_DEPTH} levels", src.path)
        return
    raw: Any = io.BytesIO(src.data) if isinstance(src, MemorySource) else open(src.path, "rb")  # noqa: SIM115
    try:
        with _OPENERS[fmt](raw) as f:
            inner = f.read(MAX_UNWRAP + 1)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        ctx.add(R.ZIP_ERROR, f"the {fmt} stream is corrupt ({exc})", src.path)
        return
    finally:
        raw.close()
    if len(inner) > MAX_UNWRAP:
        ctx.add(R.RESOURCE_LIMIT, f"the {fmt} stream inflates past {MAX_UNWRAP} bytes; not scanned", src.path)
        return
    kind = sniff_bytes(inner[:512], len(inner))
    ctx.add(R.WRAPPED, f"a {fmt} stream holding a {kind.split(':', 1)[-1]} ({len(inner)} bytes); scanned inside",
            src.path)
    _scan_source(ctx, MemorySource(inner, f"{src.path}!{fmt}"), kind, depth + 1)


_SCANNERS: dict[str, Callable[[_Ctx, Source, int], None]] = {
    "safetensors": _scan_safetensors,
    "zip": _scan_zip,
    "torch-legacy": _scan_legacy,
    "pickle": _scan_pickle,
    "npy": _scan_npy,
    "tar": _scan_tar,
}
