"""The safetensors reader: validate the whole header, then trust it. (The writer lives in
``safetensors_write`` and is re-exported here.)

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Every
check below has its own message naming the tensor, so a user learns exactly what is wrong.
"""

from __future__ import annotations

import json
import mmap
import struct
from typing import Any

from .. import dtypes
from ..errors import FormatError, ResourceLimitError, TruncatedFileError, UnsafeFileError
from ..model import MemorySource, ModelFile, Source, TensorRef
from .probe import Probe, importable, probe
from .safetensors_write import Header, OutTensor, WriteStats, layout, write_stream
from .torch_legacy import magic_kind

__all__ = ["Header", "OutTensor", "WriteStats", "layout", "parse_header", "pickle_polyglot", "read_safetensors",
           "write_stream"]

#: The header may not exceed this many bytes (the reference implementation uses the same cap).
MAX_HEADER = 100 * 1024 * 1024


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_header(path: str, source: Source) -> tuple[dict[str, Any], dict[str, str], int]:
    """Read and validate the header.

    Returns:
        (entries by name, metadata, absolute offset of the data buffer).

    Raises:
        FormatError: with a precise reason for every violation.
    """
    size = source.size
    if size < 8:
        raise TruncatedFileError(path, f"the file has {size} bytes, too few for a safetensors header")
    (n,) = struct.unpack("<Q", source.pread(8, 0))
    if n > MAX_HEADER:
        raise ResourceLimitError(path, f"the safetensors header claims {n} bytes (the limit is {MAX_HEADER})")
    if 8 + n > size:
        raise TruncatedFileError(path, f"the safetensors header claims {n} bytes but the file has only {size - 8} after it")
    raw = source.pread(n, 8)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise FormatError(path, "the safetensors header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise FormatError(path, f"the safetensors header names {exc.args[0]!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(path, f"the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(path, "the safetensors header is not a JSON object")

    metadata_raw = header.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if metadata_raw is not None:
        if not isinstance(metadata_raw, dict):
            raise FormatError(path, "__metadata__ must map strings to strings")
        for k, v in metadata_raw.items():
            if not isinstance(v, str):
                raise FormatError(path, f"__metadata__[{k!r}] is a {type(v).__name__}, not a string")
            metadata[k] = v

    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, Any] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(path, f"tensor {name!r}: an entry needs exactly dtype, shape and data_offsets")
        code = info["dtype"]
        dt = dtypes.BY_ST.get(code) if isinstance(code, str) else None
        if dt is None:
            raise FormatError(path, f"tensor {name!r}: unknown dtype {code!r}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise FormatError(path, f"tensor {name!r}: shape must be a list of non-negative integers")
        offsets = info["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise FormatError(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if numel * dt.itemsize != end - begin:
            raise FormatError(
                path,
                f"tensor {name!r}: shape {shape} x {dt.itemsize} bytes = {numel * dt.itemsize}, "
                f"but data_offsets span {end - begin} bytes",
            )
        if end > data_len:
            raise TruncatedFileError(
                path, f"tensor {name!r}: data ends at byte {end} of a {data_len}-byte data buffer"
            )
        entries[name] = (dt, tuple(shape), begin, end)
        spans.append((begin, end, name))

    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise FormatError(path, f"tensor {name!r}: data at byte {begin} {what}")
        cursor = end
    if cursor != data_len:
        raise FormatError(path, f"the tensors cover {cursor} bytes but the data buffer has {data_len}")
    return entries, metadata, data_start


#: Bytes of the file probed as a pickle at first; the rest only while the pickle runs on past them.
POLYGLOT_HEAD = 64 * 1024


def pickle_polyglot(source: Source) -> str | None:
    """What ``torch.load`` or ``pickle.load`` would do with this file from byte 0, if it matters.

    ``torch.load`` unpickles any file that is not a zip archive, whatever its name, and the 8-byte
    header length and the JSON after it can spell a pickle that runs on into the tensor data. The
    pickle is probed from byte 0 over ``POLYGLOT_HEAD`` bytes, and over the whole file (mapped)
    only while it runs past them. It matters when it reaches any global (allowed or not: an
    ordinary header never spells a dotted name and its newlines), makes an unsafe call, or ends
    in a value torch's legacy magic-number check could take (then torch reads on). A pickle
    that only yields a constant does not count: ordinary headers do that by chance (a SHORT_BINSTRING
    length lands on a ``.`` of a tensor name), about one file in 550 of a sample of realistic
    headers, and nothing runs.

    Returns:
        None, or what the pickle does, in words.
    """
    head = source.pread(min(source.size, POLYGLOT_HEAD), 0)
    p = probe(head)
    if p.error is None or p.error.kind != "truncated" or source.size <= len(head) or _effect(p) is not None:
        return _effect_both(head, p)
    if isinstance(source, MemorySource):
        return _effect_both(source.data, probe(source.data))
    source.materialize()
    with mmap.mmap(source.fd, 0, access=mmap.ACCESS_READ) as data:
        return _effect_both(data, probe(data))


def _effect_both(data: Any, p: Probe) -> str | None:
    """The effect in the contiguous reading, else in the frame-dropping one (io.BytesIO)."""
    found = _effect(p)
    if found is None and any(kind == "frame" for _m, _o, kind in p.unsafe):
        found = _effect(probe(data, drop_frames=True))
    return found


def _effect(p: Probe) -> str | None:
    for module, name, _off in p.seen + p.refused:
        if importable(module, name):
            return f"byte 0 starts a pickle that reaches the global {module}.{name}"
    for message, _off, kind in p.unsafe:
        if kind != "frame":
            return f"byte 0 starts a pickle that makes an unsafe call ({message})"
    if p.end is None:
        return None
    if magic_kind(p.value) != "no":
        return "byte 0 starts a pickle whose value torch.load could take for the legacy magic number"
    return None


def read_safetensors(path: str, source: Source) -> ModelFile:
    """Open a safetensors file (the caller owns ``source``).

    Raises:
        FormatError: the header fails validation.
        UnsafeFileError: the file is also a pickle from byte 0 (see ``pickle_polyglot``).
    """
    entries, metadata, data_start = parse_header(path, source)
    polyglot = pickle_polyglot(source)
    if polyglot is not None:
        raise UnsafeFileError(path, f"refused to load: this safetensors file is also a pickle ({polyglot}); "
                                    "torch.load would run it")
    tensors: dict[str, TensorRef] = {}
    # Keep file order (by offset), which is also what the reference writer produces.
    for name, (dt, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        strides = _c_strides(shape)
        tensors[name] = TensorRef(
            name=name, dtype=dt, shape=shape, strides=strides, storage_offset=0,
            storage_start=data_start + begin, storage_nbytes=end - begin, storage_key=name, source=source,
        )
    return ModelFile(
        path=path, container="safetensors", size=source.size, tensors=tensors, metadata=metadata,
        key_paths={k: (k,) for k in tensors}, info={"header_bytes": data_start - 8}, source=source,
    )


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))
