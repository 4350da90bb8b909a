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

import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import FormatError, ModelkitError, RemoteError, UnsafeFileError, UsageError
from ..formats.numpy_file import NPY_MAGIC, parse_npy_header
from ..formats.pickle_vm import COMPUTED, PickleError, PickleVM, opcode_name
from ..formats.probe import Probe, probe, probe_chain, tail, unsafe_collector
from ..formats.sniff import sniff, sniff_bytes
from ..formats.unpickler import ALLOWED, collect, make_policy
from ..model import MemorySource, Source
from ..remote import NO_PINS, is_remote
from . import rules as R
from .report import FileReport, Finding, ScanReport, combine

MAX_CONCATENATED = 64
MAX_DEPTH = 3
#: A compressed wrapper inflates, in memory, to at most UNWRAP_RATIO bytes per byte of input, at
#: least UNWRAP_FLOOR and never more than MAX_UNWRAP (see ``unwrap_budget``).
MAX_UNWRAP = 256 * 1024 * 1024
UNWRAP_RATIO = 64
UNWRAP_FLOOR = 32 * 1024 * 1024
UNWRAP_CHUNK = 1024 * 1024


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
        return self.run_pickle_value(data, member, base, persistent_load, depth)[0]

    def run_pickle_value(self, data: Any, member: str, base: int, persistent_load: Callable[[Any], Any] | None,
                         depth: int = 0, drop_frames: bool = False) -> tuple[int | None, Any]:
        """Scan one pickle stream, as read from memory; when its frames read differently from a
        file or io.BytesIO, scan that reading too. Returns (end, value)."""
        found: list[tuple[str, str, int]] = []
        unsafe: list[tuple[str, int, str]] = []
        policy = make_policy(collect(found), persistent_load, unsafe_collector(unsafe))
        vm = PickleVM(data, policy, base_offset=base, drop_frames=drop_frames)
        vm.blobs = []
        self.pickles += 1
        end: int | None = None
        value: Any = None
        try:
            value = vm.run()
            end = vm.end_pos
        except PickleError as exc:
            rule = R.RESOURCE_LIMIT if exc.kind == "limit" else R.PICKLE_ERROR
            self.add(rule, f"{exc}", member, exc.offset, opcode=_opcode_at(data, exc.offset - base))
        opcode_at: Callable[[int], str | None] = lambda off: _opcode_at(data, off - base)  # noqa: E731
        self.note_globals(vm.globals_seen, found, member, opcode_at)
        self.note_unsafe(unsafe, member, opcode_at)
        self.scan_nested(vm.blobs, vm.nested_loads, member, depth)
        if vm.frame_anomalies and not drop_frames:
            self.run_pickle_value(data, f"{member} (read as torch reads io.BytesIO)", base, persistent_load, depth,
                                  drop_frames=True)
        return end, value

    def note_probe(self, p: Probe, member: str, data: Any, base: int, depth: int) -> None:
        """Findings of a probe: only globals that could be imported (tensor bytes make noise)."""
        self.note_globals([], [r for r in p.dangerous if r[0] != "<call>"], member,
                          lambda off: _opcode_at(data, off - base))
        self.note_unsafe([u for u in p.unsafe if u[2] != "frame" or p.is_pickle], member,
                         lambda off: _opcode_at(data, off - base))
        self.scan_nested(p.blobs, [], member, depth)

    def note_unsafe(self, unsafe: list[tuple[str, int, str]], member: str,
                    opcode_at: Callable[[int], str | None] = lambda off: None) -> None:
        for message, off, kind in unsafe:
            self.add(R.FRAME_ANOMALY if kind == "frame" else R.UNSAFE_CALL, message, member, off, opcode=opcode_at(off))

    def scan_nested(self, blobs: list[bytes] | None, loads: list[bytes], member: str, depth: int) -> None:
        """Scan byte constants that are files of their own: those that look like a pickle or a
        zip, and every value torch.load would run (``_load_from_bytes``), whatever it looks like."""
        done: set[int] = set()
        for blob in loads:
            if id(blob) not in done:
                done.add(id(blob))
                self.scan_blob(blob, member, depth + 1, force=True)
        for blob in blobs or ():
            if id(blob) not in done:
                done.add(id(blob))
                self.scan_blob(blob, member, depth + 1)

    def scan_blob(self, blob: bytes, member: str, depth: int, force: bool = False) -> None:
        if depth > MAX_DEPTH:
            self.add(R.RESOURCE_LIMIT, f"nesting deeper than {MAX_DEPTH} levels was not scanned (it exceeds a "
                                       "resource bound)", member)
            return
        offset = getattr(blob, "offset", None)
        label = f"{member} > bytes@{offset}" if offset is not None else f"{member} > bytes"
        kind = sniff_bytes(bytes(blob[:512]), len(blob))
        if kind.startswith("unknown"):
            if not force:
                return
            kind = "pickle"  # torch.load tries it as a tar, then unpickles it from byte 0
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
        return opcode_name(data[rel]) if 0 <= rel < len(data) else None
    except (IndexError, TypeError, ValueError):
        return None


def _qual(module: str, name: str) -> str:
    q = f"{module}.{name}"
    if q.isprintable() and len(q) <= 200:
        return q
    return ascii(q)[:200]


_ALLOW_FORM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def check_allow(allow: Iterable[str]) -> tuple[str, ...]:
    """The ``--allow`` entries, sorted and de-duplicated, each checked to be ``module.name``.

    Raises:
        UsageError: an entry is not of that form (it could never match, so it would be a silent no-op).
    """
    out = tuple(sorted(set(allow)))
    for entry in out:
        if not _ALLOW_FORM.fullmatch(entry):
            raise UsageError(None, f"--allow {entry!r} is not a MODULE.NAME global (for example collections.OrderedDict)")
    return out


def scan_file(path: str | os.PathLike[str], allow: Iterable[str] = (), require_safetensors: bool = False, *,
              source: Source | None = None) -> FileReport:
    """Scan one file statically.

    Args:
        path: the file.
        allow: audited ``module.name`` globals to accept for this scan (reported, never silent).
        require_safetensors: any container but safetensors is a finding (a repository policy).
        source: ``path`` already open as a remote source (a reader's): scanned through it, so the
            bytes it fetched are not fetched again; the caller keeps it open.

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
    remote: dict[str, Any] | None = None
    try:
        src: Source
        if source is not None:
            from ..formats.sniff import sniff_bytes

            remote = _remote_info()
            src, container = source, sniff_bytes(source.pread(min(512, source.size), 0), source.size)
        elif is_remote(p):
            remote = _remote_info()
            src, container = _open_remote(p, remote)
        else:
            container = sniff(p, wrappers=True, unknown_ok=True)
            src = Source(p)
        try:
            _scan_source(ctx, src, container, 0)
            if remote is not None:
                src.finish()  # type: ignore[attr-defined]
        finally:
            if remote is not None:
                remote.update(src.transfer.to_dict(), size=src.size)  # type: ignore[attr-defined]
                remote.update(getattr(src, "pins", {}))
                remote["notes"] = list(src.notes)  # type: ignore[attr-defined]
            if source is None:
                src.close()
    except RemoteError as exc:
        specific = exc.remedy and exc.remedy != RemoteError.default_remedy  # what to do: Set HF_TOKEN, Check the URL
        ctx.add(R.REMOTE_ERROR, f"{exc.problem}. {exc.remedy}" if specific else exc.problem)
    except ModelkitError as exc:
        ctx.add(R.NOT_MODEL if container is None else R.HEADER_ERROR, exc.problem)
    except Exception as exc:  # noqa: BLE001 - a scanner crash must not let a file through
        ctx.add(R.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    if require_safetensors and container not in (None, "safetensors"):
        ctx.add(R.PICKLE_FORMAT, f"a {container} file; only .safetensors model files are allowed here")
    if container is not None and container.startswith("unknown:"):
        container = "unknown"
    return FileReport(p, container, combine(ctx.findings), tuple(ctx.findings), ctx.pickles, tuple(ctx.globals),
                      remote)


def _remote_info() -> dict[str, Any]:
    """A remote result's ``remote`` entry before anything is read: what it cost and what names the
    bytes read (``etag``; for ``hf://``, the ``commit`` and the Hub's ``sha256``, and whether the bytes were
    checked against it: only a file read whole can be)."""
    return {"requests": 0, "bytes": 0, "whole_file": False, "notes": [], "size": None, **NO_PINS,
            "sha256_checked": False}


def _open_remote(url: str, remote: dict[str, Any]) -> tuple[Source, str]:
    """A remote file opened for ranged reads, and its container (sniffed from its first bytes).
    Containers that are read whole (anything but zip, safetensors and GGUF) are downloaded first."""
    from ..formats.sniff import sniff_bytes
    from ..remote.source import RemoteSource

    src = RemoteSource(url)
    try:
        container = sniff_bytes(src.head[:512], src.size)
        if container not in ("zip", "safetensors", "gguf"):
            src.materialize()
    except BaseException:
        remote.update(src.transfer.to_dict(), size=src.size, notes=list(src.notes), **src.pins)
        src.close()
        raise
    return src, container


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
    allowed = check_allow(allow)
    return ScanReport(tuple(scan_many(files, allowed, jobs, require_safetensors)), allowed, strict)


def scan_many(files: list[str], allow: tuple[str, ...], jobs: int, require_safetensors: bool = False,
              ordered: bool = True) -> Iterable[FileReport]:
    """Yield reports, in input order unless ``ordered`` is false (then as each file finishes).

    Local files are scanned by ``jobs`` processes (the work is CPU-bound); when any file is
    remote, by ``jobs`` threads (the work is waiting on the network).
    """
    if jobs <= 1 or len(files) < 2:
        for f in files:
            yield scan_file(f, allow, require_safetensors)
        return
    import concurrent.futures as cf

    args = [(f, allow, require_safetensors) for f in files]
    pool: cf.Executor
    if any(is_remote(f) for f in files):
        pool = cf.ThreadPoolExecutor(max_workers=jobs)
    else:
        import multiprocessing

        # spawn everywhere: what Windows and macOS use anyway, and no fork of a process that has
        # threads (a progress bar's, a hash's); the workers import modelkit afresh.
        pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    with pool:
        if ordered:
            yield from pool.map(_scan_one, args, chunksize=1 if isinstance(pool, cf.ThreadPoolExecutor) else 4)
            return
        pending = [pool.submit(_scan_one, a) for a in args]
        for fut in cf.as_completed(pending):
            yield fut.result()


# -- per-container scanners ------------------------------------------------------------------------


def _scan_source(ctx: _Ctx, src: Source, kind: str, depth: int) -> None:
    """Scan what loaders would read, the way torch.load decides it.

    A file starting with a zip local header is a zip archive. Anything else is first tried as a
    tar archive (old torch checkpoints), then unpickled from byte 0, whatever it looks like;
    only a valid safetensors header, an .npy header and compressed wrappers cannot start a
    pickle (their first byte is not an opcode that could reach a global).
    """
    try:
        if kind == "zip":
            _scan_zip(ctx, src, depth)
        elif kind.startswith("wrapped:"):
            _scan_wrapped(ctx, src, kind[8:], depth)
        elif kind == "npy":
            _scan_npy(ctx, src, depth)
        else:
            _scan_tar(ctx, src, depth)
            if kind == "safetensors" and _scan_safetensors(ctx, src, depth):
                return
            if kind == "gguf":
                _check_gguf(ctx, src)
            _scan_byte0(ctx, src, kind, depth)
    except UnsafeFileError as exc:
        ctx.add(R.OBJECT_ARRAY if "object" in exc.problem else R.UNSAFE_GLOBAL, exc.problem, src.path)
    except FormatError as exc:
        ctx.add(R.HEADER_ERROR, exc.problem, src.path if isinstance(src, MemorySource) else None)


def _m(src: Source, member: str) -> str:
    """A member label; for nested or unwrapped data it says where the data came from."""
    return f"{src.path} > {member}" if isinstance(src, MemorySource) else member


def _data(src: Source) -> Any:
    if isinstance(src, MemorySource):
        return src.data
    if src.fd < 0:  # a remote file still read by ranges (a GGUF): fetched as far as the scan reads
        from ..remote.source import RemoteBytes, RemoteSource

        if isinstance(src, RemoteSource):
            return RemoteBytes(src)
    src.materialize()
    return mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ)


def _scan_safetensors(ctx: _Ctx, src: Source, depth: int) -> bool:
    """Validate the header, then probe byte 0 as a pickle (torch.load unpickles any non-zip file,
    whatever its name). True when the header is valid and byte 0 runs nothing as a pickle; a
    polyglot is a finding, and the caller then scans it as the pickle it also is."""
    from ..formats.safetensors_file import parse_header, pickle_polyglot

    try:
        parse_header(src.path, src)
    except FormatError as exc:
        ctx.add(R.HEADER_ERROR, exc.problem, src.path if isinstance(src, MemorySource) else None)
        return False
    polyglot = pickle_polyglot(src)
    if polyglot is None:
        return True
    ctx.add(R.SAFETENSORS_POLYGLOT, f"a valid safetensors header, and {polyglot}", _m(src, "pickle"), 0)
    return False


def _check_gguf(ctx: _Ctx, src: Source) -> None:
    """A GGUF file holds no pickle; its header must still be valid (then byte 0 is probed as any
    non-zip file is, since torch.load would unpickle it)."""
    from ..formats.gguf_file import read_gguf

    try:
        read_gguf(src.path, src)
    except FormatError as exc:
        ctx.add(R.HEADER_ERROR, exc.problem, src.path if isinstance(src, MemorySource) else None)


def _scan_zip(ctx: _Ctx, src: Source, depth: int) -> None:
    """Every central directory any reader finds, members read as torch reads them (see zipscan)."""
    from .zipscan import scan_zip

    scan_zip(ctx, src, depth)


def _scan_stream_chain(ctx: _Ctx, data: Any, member: str, base: int, pload: Any, depth: int) -> int:
    """Scan a pickle and any pickles after it, as a loop of ``pickle.load`` reads them.

    Returns where the last complete pickle ended (relative to ``data``).
    """
    end = ctx.run_pickle(data, member, base, pload, depth)
    if end is None:
        return len(data)
    pos = end
    for i in range(1, MAX_CONCATENATED):
        if pos >= len(data):
            break
        rest = tail(data, pos)
        p = probe(rest, base + pos, keep_blobs=True)
        if not p.is_pickle:
            ctx.note_probe(p, f"{member} (after STOP)", rest, base + pos, depth)
            break
        ctx.add(R.TRAILING_PICKLE, "another pickle follows the first one; it is scanned too", member, base + pos)
        assert p.end is not None
        ctx.run_pickle(rest, f"{member} (pickle #{i + 1})", base + pos, pload, depth)
        pos += p.end
    return pos


def _scan_byte0(ctx: _Ctx, src: Source, kind: str, depth: int) -> None:
    """Unpickle from byte 0 as torch.load's legacy path does: a legacy stream when the first
    pickle passes torch's magic-number check (however it is spelled), else pickles as far as
    they go. A first pickle that torch might or might not take for the magic is read both ways."""
    from ..formats.torch_legacy import magic_kind

    label = _m(src, "pickle")
    data = _data(src)
    try:
        claimed = kind in ("pickle", "torch-legacy")
        first = probe(data, 0)
        magic = magic_kind(first.value) if first.is_pickle else "no"
        if magic == "exact":
            _scan_legacy(ctx, src, data, depth)
        elif first.is_pickle or claimed:
            end = _scan_stream_chain(ctx, data, label, 0, None, depth)
            _after_stop(ctx, src, data, end, label, depth)
        if magic == "maybe":
            if not first.refused and not first.unsafe:
                ctx.add(R.MAGIC_SPELLING, f"the first pickle is a {type(first.value).__name__}, which torch's check "
                                          "could take for the legacy magic number", label, 0)
            # read as torch would if it took the magic; as it might not, a failure of that
            # reading is no evidence (the reading above is what runs then)
            _scan_legacy(ctx, src, data, depth, quiet_errors=True)
        elif magic == "no" and not (first.is_pickle or claimed):
            # Not a pickle; still report what a loader would have reached before failing.
            first = probe(data, 0, keep_blobs=True)
            ctx.note_probe(first, label, data, 0, depth)
            if not first.dangerous and kind.startswith("unknown") and not ctx.findings:
                ctx.add(R.NOT_MODEL, f"not a model file ({kind.split(':', 1)[-1]})")
        _check_polyglot(ctx, src, depth)
    finally:
        if not isinstance(data, bytes):
            data.close()


def _after_stop(ctx: _Ctx, src: Source, data: Any, end: int, label: str, depth: int) -> None:
    rest = len(data) - end
    if rest > 0 and not _has_zip_directory(src):
        ctx.add(R.TRAILING_PICKLE, f"{rest} bytes follow the pickle's STOP", label, end)


def _scan_legacy(ctx: _Ctx, src: Source, data: Any, depth: int, drop_frames: bool = False,
                 quiet_errors: bool = False) -> None:
    from ..formats.torch_legacy import parse_stream

    found: list[tuple[str, str, int]] = []
    unsafe: list[tuple[str, int, str]] = []
    seen: list[tuple[str, str, int]] = []
    nested: list[bytes] = []
    label = _m(src, "legacy stream" if not drop_frames else "legacy stream (read as from io.BytesIO)")
    end = len(data)
    try:
        stream = parse_stream(data, collect(found), scan_globals=seen, on_unsafe=unsafe_collector(unsafe),
                              drop_frames=drop_frames, lenient_magic=True, nested_loads=nested)
        ctx.pickles += len(stream.pickle_spans)
        end = stream.end
    except PickleError as exc:
        if quiet_errors and exc.kind != "limit":
            end = len(data)  # not a legacy stream after all: nothing more to read this way
        else:
            rule = R.RESOURCE_LIMIT if exc.kind == "limit" else R.PICKLE_ERROR
            ctx.add(rule, str(exc), label, exc.offset, opcode=_opcode_at(data, exc.offset))
    ctx.note_globals(seen, found, label, lambda off: _opcode_at(data, off))
    ctx.note_unsafe(unsafe, label, lambda off: _opcode_at(data, off))
    ctx.scan_nested([], nested, label, depth)
    if any(kind == "frame" for _m_, _o, kind in unsafe) and not drop_frames:
        _scan_legacy(ctx, src, data, depth, drop_frames=True, quiet_errors=quiet_errors)
    if end < len(data) and not drop_frames:
        rest = tail(data, end)
        for p in probe_chain(rest, end):
            ctx.note_probe(p, label, rest, end, depth)
        _after_stop(ctx, src, data, end, label, depth)


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
    """torch.load first tries every non-zip file as a tar archive (torch < 0.4 checkpoints): scan
    every pickle its tar loader reads, at the offset it reads it (see tarscan)."""
    from .tarscan import scan_tar

    scan_tar(ctx, src, depth, lambda member: _m(src, member))


def _open_wrapped(fmt: str, raw: Any) -> Any:
    """A reader that inflates ``raw``; the codec modules are imported here, where a scan needs them."""
    if fmt == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw)
    if fmt == "bzip2":
        import bz2

        return bz2.BZ2File(raw)
    import lzma

    return lzma.LZMAFile(raw)


def unwrap_budget(size: int) -> int:
    """How many bytes a compressed wrapper of ``size`` bytes may inflate to before the scan stops."""
    return min(MAX_UNWRAP, max(UNWRAP_FLOOR, UNWRAP_RATIO * size))


def _scan_wrapped(ctx: _Ctx, src: Source, fmt: str, depth: int) -> None:
    """Decompress a gzip/bzip2/xz wrapper and scan what is inside.

    The stream is inflated in steps of a MiB, into memory, up to ``unwrap_budget(size)`` bytes
    (time and memory in proportion to the input). A stream that inflates further is a
    ``RESOURCE_LIMIT`` finding, and only the bytes within the budget are scanned (a payload near
    the start is still found). A corrupt stream is scanned as far as it inflates, since a loader
    runs what it unpickled before the error.
    """
    import io
    import lzma

    if depth >= MAX_DEPTH:
        ctx.add(R.RESOURCE_LIMIT, f"a {fmt} wrapper nested deeper than {MAX_DEPTH} levels exceeds a resource bound",
                src.path)
        return
    budget = unwrap_budget(src.size)
    out = io.BytesIO()
    over = False
    if isinstance(src, MemorySource):
        raw: Any = io.BytesIO(src.data)
    elif type(src) is Source:
        raw = open(src.path, "rb")  # noqa: SIM115 - closed below
    else:  # a remote file: its local copy, read from the start through a descriptor of its own
        src.materialize()
        raw = os.fdopen(os.dup(src.fd), "rb")
        raw.seek(0)
    try:
        with _open_wrapped(fmt, raw) as f:
            while True:
                chunk = f.read(min(UNWRAP_CHUNK, budget - out.tell()) or 1)
                if not chunk:
                    break
                if out.tell() >= budget:
                    over = True
                    break
                out.write(chunk)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        ctx.add(R.ZIP_ERROR, f"the {fmt} stream is corrupt ({exc}); what it inflated to before the error was scanned",
                src.path)
    finally:
        raw.close()
    inner = out.getvalue()
    del out
    if over:
        ctx.add(R.RESOURCE_LIMIT, f"the {fmt} stream inflates past {budget} bytes ({UNWRAP_RATIO} times its size, at "
                                  f"least {UNWRAP_FLOOR}, at most {MAX_UNWRAP}), which exceeds a resource bound; only "
                                  f"its first {budget} bytes were scanned", src.path)
    if not inner:
        return
    kind = sniff_bytes(inner[:512], len(inner))
    ctx.add(R.WRAPPED, f"a {fmt} stream holding a {kind.split(':', 1)[-1]} ({len(inner)} bytes); scanned inside",
            src.path)
    _scan_source(ctx, MemorySource(inner, f"{src.path}!{fmt}"), kind, depth + 1)
